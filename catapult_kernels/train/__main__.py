import os
import sys

from .cli import main
from .parallel import launched_by_torchrun

code = main()
if launched_by_torchrun():
    # gloo's threads can abort the interpreter's teardown (`terminate called without an active
    # exception`) even after the barrier and destroy_process_group: leave without it, flushed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
