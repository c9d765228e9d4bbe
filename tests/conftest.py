import os
import sys

# Make tests/helpers.py importable as `helpers` whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
