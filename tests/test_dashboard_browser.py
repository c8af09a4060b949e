"""The dashboard in a real browser: Chromium or Chrome driven by Playwright (no browser download; where it is found,
or why the tests are skipped: tests/support/chromium.py, PARALOOP_CHROMIUM).

One browser for the module. A tiny-model `paraloop run` with a control token: the page asks for the token, refuses a
wrong one, then shows curves that gain a point after a learner step, the latest rollouts, and drives pause / step /
resume / stop. Two runs' files compared side by side; `paraloop serve`'s read-only view. No console errors anywhere
but the refusal of the wrong token.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import procs
from support.chromium import find_chromium
from support.serving import Serve
from support import wait_for_server
from support.runs import call, finish, paraloop_run

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "dashboard-s3cret"
WAIT_MS = 60_000

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def browser():
    executable, why = find_chromium()
    if executable is None:
        if os.environ.get("CI"):  # CI installs chromium (make browser): a missing one there is a failure
            pytest.fail(f"CI: {why}", pytrace=False)
        pytest.skip(why)
    from playwright.sync_api import expect, sync_playwright

    # expect() has a default of its own (5 s), apart from the page's: the waits on a run's progress (its first
    # learner step, under a loaded CI machine) need the page's WAIT_MS too
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=FLAGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


class Page:
    """A fresh page that records console errors, uncaught exceptions and every URL it requests."""

    def __init__(self, browser) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.urls.append(r.url))

    def close(self) -> None:
        self.context.close()


def points(page, chart: str) -> int:
    return int(page.locator(f'[data-chart="{chart}"]').get_attribute("data-points") or 0)


def settled_step(base: str, deadline_s: float = 60) -> int:
    """The step count once the paused learner has finished the step it had in flight."""
    end, last, same = time.time() + deadline_s, -1, 0
    while time.time() < end:
        status = call(f"{base}/control/status", token=TOKEN)[1]
        same = same + 1 if status["step"] == last and status["learner_held"] else 0
        last = status["step"]
        if same >= 3:
            return last
        time.sleep(0.3)
    raise AssertionError("the paused learner did not settle")


def test_live_run_token_curves_rollouts_and_controls(browser, tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    with paraloop_run(
        tiny_model_path, run_dir, "--steps", "1000", "--checkpoint-interval", "0", "--control-token", TOKEN
    ) as proc:
        view = Page(browser)
        try:
            live_session(view, proc, run_dir)
        finally:
            view.close()


def live_session(view: "Page", proc: subprocess.Popen, run_dir: Path) -> None:
    from playwright.sync_api import expect

    page = view.page
    base = wait_for_server(proc, run_dir)
    page.goto(f"{base}/dashboard")
    expect(page.locator("#token-dialog")).to_be_visible()
    page.wait_for_load_state("load")
    assert view.errors == [], "the page loads with no console errors"

    page.fill("#token-input", "wrong-token")
    page.click("#token-ok")
    expect(page.locator("#token-msg")).to_have_class("error")
    expect(page.locator("#token-msg")).to_contain_text("refused")
    assert view.errors and all("401" in e for e in view.errors), view.errors
    assert call(f"{base}/control/status", token=TOKEN)[1]["paused"] is False, "a refused token changed nothing"
    view.errors.clear()

    page.fill("#token-input", TOKEN)
    page.click("#token-ok")
    badge = page.locator("#state-badge")
    expect(badge).to_have_text("training")
    expect(page.locator(".sample .tok").first).to_be_visible()  # a rollout, token by token
    assert page.locator(".sample").count() >= 1
    expect(page.locator('[data-kpi="adapter"] .value')).to_have_text(re.compile(r"v\d+"))

    page.click("button[data-action=pause]")
    expect(badge).to_have_text(re.compile("^paus(ing|ed)$"))  # "pausing" until the step in flight is done
    expect(badge).to_have_text("paused", timeout=60_000)
    assert call(f"{base}/control/status", token=TOKEN)[1]["paused"] is True
    step = settled_step(base)
    expect(page.locator('[data-chart="reward"]')).to_have_attribute("data-points", str(step))
    page.click("button[data-action=step]")
    expect(page.locator('[data-chart="reward"]')).to_have_attribute("data-points", str(step + 1))
    expect(page.locator('[data-chart="loss"]')).to_have_attribute("data-points", str(step + 1))
    expect(page.locator(".toast.ok").last).to_contain_text(f"Step {step + 1} done")
    assert call(f"{base}/control/status", token=TOKEN)[1]["step"] == step + 1, "exactly one step"

    page.click("button[data-action=resume]")
    expect(badge).to_have_text("training")
    assert call(f"{base}/control/status", token=TOKEN)[1]["paused"] is False
    expect(page.locator('[data-chart="reward"]')).not_to_have_attribute("data-points", str(step + 1))

    page.click("#config-panel > summary")
    expect(page.locator("#config")).to_contain_text("control_token")
    expect(page.locator("#config")).to_contain_text('"<redacted>"')
    expect(page.locator("#config")).not_to_contain_text(TOKEN)

    page.click("button[data-action=stop]")
    page.click("#confirm-ok")
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    expect(badge).to_have_attribute("data-state", "disconnected")
    assert not [u for u in view.urls if TOKEN in u], "the token never goes into a URL"
    assert TOKEN not in err, "nor into the log"
    assert [e for e in view.errors if "ERR_CONNECTION_REFUSED" not in e] == [], view.errors


def write_run(run: Path, rewards: list[float], eval_every: int = 2) -> None:
    run.mkdir(parents=True)
    with (run / "metrics.jsonl").open("w") as f:
        for step in range(0, len(rewards) + 1, eval_every):  # held-out evaluations, from the starting adapter on
            f.write(
                json.dumps(
                    {
                        "kind": "eval",
                        "step": step,
                        "version": step,
                        "task": "mock:arithmetic",
                        "reward_mean": 0.1 * step,
                        "pass@1": 0.05 * step,
                        "pass@4": 0.1 * step,
                        "time_s": 3.0,
                    }
                )
                + "\n"
            )
        for i, r in enumerate(rewards, 1):
            f.write(
                json.dumps(
                    {
                        "step": i,
                        "reward_mean": r,
                        "reward_std": 0.1,
                        "loss": 1 - r,
                        "kl": 0.01 * i,
                        "entropy": 2.0,
                        "clip_fraction": 0.0,
                        "ratio_mean": 1.0,
                        "ratio_min": 0.9,
                        "ratio_max": 1.1,
                        "tokens_per_s": 500.0,
                        "generation_tokens_per_s": 900.0,
                        "step_time_s": 0.5,
                        "swap_pause_ms": 0.2,
                        "queue_rollouts": 0,
                        "rss_bytes": 2e8,
                        "adv_mean": 0.01 * i,
                        "skipped": False,
                        "swap_pause_note": None,
                    }
                )
                + "\n"
            )
    sample = {
        "step": len(rewards),
        "adapter_version": len(rewards),
        "rollout_version": len(rewards) - 1,
        "group": 0,
        "row": 0,
        "reward": 1.0,
        "advantage": 0.8,
        "prompt": "<|im_start|>user\nName a fruit.<|im_end|>\n",
        "prompt_truncated": False,
        "tokens": [" Ban", "ana", "\n"],
        "logprobs": [-0.05, -2.0, -6.0],
        "completion_truncated": False,
    }
    (run / "rollouts.jsonl").write_text(json.dumps({"step": len(rewards), "samples": [sample]}) + "\n")


def test_compare_two_finished_runs(browser, tmp_path):
    from playwright.sync_api import expect

    write_run(tmp_path / "lr-1e-4", [0.1, 0.3, 0.5, 0.7])
    write_run(tmp_path / "lr-1e-5", [0.1, 0.15, 0.2, 0.25, 0.3, 0.35], eval_every=3)
    cmd = [
        sys.executable,
        "-m",
        "paraloop",
        "dashboard",
        str(tmp_path / "lr-1e-4"),
        str(tmp_path / "lr-1e-5"),
        "--port",
        "0",
    ]
    with procs.running(cmd, stderr=subprocess.PIPE, text=True) as proc:
        url = procs.Lines(proc.stderr).expect(r"(http://\S+/dashboard)", timeout=60).group(1)
        view = Page(browser)
        try:
            page = view.page
            page.goto(url)
            expect(page.locator("#state-badge")).to_have_text("compare")
            expect(page.locator('[data-chart="reward"]')).to_have_attribute("data-points", "6")
            evals = page.locator('[data-chart="eval"]')  # steps 0, 2, 4 and 0, 3, 6: five distinct steps
            expect(evals).to_have_attribute("data-points", "5")
            expect(evals.locator(".u-legend")).to_contain_text("lr-1e-4 · pass@4")
            expect(evals.locator(".u-legend")).not_to_contain_text("time_s")
            legend = page.locator('[data-chart="reward"] .u-legend')
            expect(legend).to_contain_text("lr-1e-4")
            expect(legend).to_contain_text("lr-1e-5")
            expect(page.locator("#runs-table tr")).to_have_count(3)
            expect(page.locator("#rollout-run")).to_be_visible()
            expect(page.locator(".sample .tok")).to_have_count(3)
            assert page.locator(".sample .tok").nth(2).get_attribute("style"), "an unlikely token is coloured"
            assert page.locator(".sample .tok").first.get_attribute("style") is None, "a likely token is not"
            expect(page.locator("#controls")).to_be_hidden()
            page.click("#more-panel > summary")  # every other number a step records
            expect(page.locator('[data-chart="m-adv_mean"]')).to_have_attribute("data-points", "6")
            assert view.errors == [], view.errors
        finally:
            view.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "SIGTERM stops paraloop dashboard cleanly"


def test_serve_has_a_read_only_view(browser, tiny_model_path):
    from playwright.sync_api import expect

    with Serve("--model-path", str(tiny_model_path)) as server:
        base = server.url
        view = Page(browser)
        try:
            page = view.page
            page.goto(f"{base}/dashboard")
            expect(page.locator("#state-badge")).to_have_text("serving")
            status, _ = call(f"{base}/v1/completions", "POST", {"prompt": "hi", "max_tokens": 4})
            assert status == 200
            expect(page.locator('[data-kpi="requests"] .value')).to_have_text("1")
            page.wait_for_function("Number(document.querySelector('[data-chart=\"s-tps\"]').dataset.points) >= 2")
            expect(page.locator("#controls")).to_be_hidden()
            expect(page.locator("#rollouts-panel")).to_be_hidden()
            assert view.errors == [], view.errors
        finally:
            view.close()
        assert server.stop(signal.SIGTERM) == 0
