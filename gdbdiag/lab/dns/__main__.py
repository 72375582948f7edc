"""``python -m gdbdiag.lab.dns --listen ADDR --port PORT --log FILE ...``"""
import sys

from .cli import main

sys.exit(main())
