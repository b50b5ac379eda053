#!/usr/bin/env python3
"""Entry shim: ``python tflaunch.py ...`` from a checkout behaves like ``python -m tflaunch ...``.

(The ``tflaunch/`` package next to this file takes precedence over this module on import.)
"""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tflaunch.cli import main

    sys.exit(main())
