from paraloop.cli import entry

entry()
