"""Root conftest: choose where the Triton kernels run, then load the suite's plugin.

Without a visible GPU the kernels run in Triton's interpreter on CPU tensors. That must be
decided before any kernel module is imported, hence here, first.
"""

import torch

from suite import interpreter

if interpreter.enable_if_no_gpu(torch.cuda.is_available()):
    interpreter.check_numpy()
    interpreter.fix_casts()

pytest_plugins = ["suite.plugin", "pytester"]  # pytester: the plugin's own tests run inner pytest sessions
