import os
import sys

# The tests import their shared drivers as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
