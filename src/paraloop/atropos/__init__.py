"""Training from Atropos environments: the run-api client (client.py), wire -> ScoredGroup translation and
validation (translate.py), and `paraloop launch-atropos` (launch.py). atroposlib itself lives in its own venv
(scripts/setup-atropos-venv.sh): paraloop only speaks run-api's HTTP protocol and never imports it."""

from paraloop.atropos.client import AtroposClient, AtroposError
from paraloop.atropos.translate import InvalidGroup, split_by_token_budget, to_scored_group, translate_batch

__all__ = [
    "AtroposClient",
    "AtroposError",
    "InvalidGroup",
    "split_by_token_budget",
    "to_scored_group",
    "translate_batch",
]
