"""The actors of `paraloop run`. Each is one file: one inbox, one loop, returning at end of stream."""
