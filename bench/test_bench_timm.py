"""timm level: SGD train steps of timm's ResNet-D models (whose downsampling shortcut is
AvgPool2d(2) -> 1x1 conv -> BatchNorm, the fused op's pattern) before and after
``hires_kernels.fuse(model)``. 224x224, bf16 autocast, channels_last; GPU only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import _util

MODELS = [("resnet50d", 128), ("resnet26d", 256)]


def _cases():
    for name, batch in MODELS:
        for fused in (False, True):
            yield pytest.param(name, batch, fused, marks=[pytest.mark.timm, pytest.mark.gpu],
                               id=f"cuda-{name}-b{batch}-{'fused' if fused else 'eager'}")


@pytest.mark.parametrize("name, batch, fused", list(_cases()))
def test_timm_train_step(benchmark, request, name, batch, fused):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (224x224 train steps at these batch sizes are GPU work)")
    timm = pytest.importorskip("timm", reason="timm is not installed")
    import hires_kernels

    fuse = getattr(hires_kernels, "fuse", None)
    if fused and fuse is None:
        pytest.skip("hires_kernels.fuse does not exist yet")
    device = "cuda"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000)
    n_fused = 0
    if fused:
        model = fuse(model) or model
        n_fused = sum(type(m).__name__ == "HierarchicalProjection" for m in model.modules())
    model = model.to(device, memory_format=torch.channels_last).train()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    info = benchmark.extra_info
    info.update(level="timm", device=device, model=name, batch=batch, fused=fused, fused_modules=n_fused,
                dtype="bf16cl", res=224)
    info.update(_util.run_benchmark(benchmark, step, device, request.config, warmup_calls=3))
    info["images_per_s"] = batch / (info["ms"] * 1e-3)
    info["peak_mem_bytes"] = _util.cuda_peak_bytes(step, device)
    key = ("timm", name, batch)
    _util.record(key, "fused" if fused else "eager", info["ms"], info)
