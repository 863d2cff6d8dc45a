"""Launcher: `python monitor.py …` is the same as the `monitor` command. No logic here."""

from monitor.main import main

raise SystemExit(main())
