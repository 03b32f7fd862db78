import sys

from llama2.cli import main

sys.exit(main())
