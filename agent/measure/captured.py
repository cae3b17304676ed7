"""What the evaluator child relies on once candidate code has run, fixed before any candidate code exists in its
process: the torch and library functions it calls (captured here, at import) and its error type.

Captured, not looked up: rebinding torch's public names later does not reach these, and the identity snapshot
(agent/measure/evaluator.py `snapshot_identities`, which covers this module and every evaluator module that imports
from it) reports a rebinding of these. The names keep a leading underscore so that a call like `_to(x, device)`
reads as the captured function, never as torch's current one.
"""
import hashlib
import json
import os
import time

import torch

_Tensor, _Module = torch.Tensor, torch.nn.Module
_to, _item = torch.Tensor.to, torch.Tensor.item
_from_numpy, _logsumexp, _gather, _unsqueeze, _squeeze = (torch.from_numpy, torch.logsumexp, torch.gather,
                                                          torch.unsqueeze, torch.squeeze)
_sub, _abs, _amax, _sum, _all, _isfinite = torch.sub, torch.abs, torch.amax, torch.sum, torch.all, torch.isfinite
_log_softmax = torch.log_softmax
_no_grad, _load_state_dict, _eval = torch.no_grad, _Module.load_state_dict, _Module.eval
_function_modes, _dispatch_modes = torch._C._len_torch_function_stack, torch._C._len_torch_dispatch_stack
_perf_counter, _sha256, _os_write, _os_exit = time.perf_counter, hashlib.sha256, os.write, os._exit
_encode_json = json.JSONEncoder(allow_nan=False).encode


class EvalError(Exception):
    """The evaluation cannot give a trustworthy number: bad data or arguments, or a candidate that fails a check."""
