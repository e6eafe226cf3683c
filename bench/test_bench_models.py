"""Model level: a whole SGD train step of ResNet-18 vs HiResNet-18 (sources "stem" and
"all"), with the projections fused or eager, with and without torch.compile.

GPU: bf16 autocast, channels_last, 32x32 batch 512 and 64x64 batch 256 (SPEC §4).
CPU: float32, NCHW, 32x32 batch 16, no torch.compile unless --bench-cpu-compile.
report.py divides each time by plain ResNet-18's in the same mode (same device,
resolution, compile on/off).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import _util

try:
    import hires

    _CREATE = getattr(hires, "create_model", None)
    _IMPORT_ERROR = None if _CREATE else "hires.create_model does not exist yet"
except Exception as e:  # noqa: BLE001
    _CREATE, _IMPORT_ERROR = None, f"hires cannot be imported: {e}"

# (name, sources, fused)
VARIANTS = [
    ("resnet18", "none", False),
    ("hiresnet18", "stem", False),
    ("hiresnet18", "stem", True),
    ("hiresnet18", "all", False),
    ("hiresnet18", "all", True),
]
SIZES = {"cpu": [(32, 16)], "cuda": [(32, 512), (64, 256)]}


def variant_label(name, sources, fused) -> str:
    if name == "resnet18":
        return "ResNet-18"
    return f"HiResNet-18 {sources} ({'fused' if fused else 'eager'})"


def _cases():
    for device, sizes in SIZES.items():
        for res, batch in sizes:
            for compiled in (False, True):
                for name, sources, fused in VARIANTS:
                    marks = [pytest.mark.model, getattr(pytest.mark, "cpu" if device == "cpu" else "gpu")]
                    if compiled:
                        marks.append(pytest.mark.compile)
                    vid = name if name == "resnet18" else f"{name}-{sources}-{'fused' if fused else 'eager'}"
                    yield pytest.param(device, res, batch, compiled, name, sources, fused, marks=marks,
                                       id=f"{device}-{res}px-b{batch}-{'compile' if compiled else 'nocompile'}-{vid}")


def build_model(name, sources, fused):
    if name == "resnet18":
        try:
            return _CREATE("resnet18", num_classes=10)
        except TypeError:
            return _CREATE("hiresnet18", num_classes=10, sources="none")
    return _CREATE(name, num_classes=10, sources=sources, fused=fused)


def make_train_step(model, device, res, batch, amp_dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with _util.autocast_ctx(device, amp_dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


@pytest.mark.parametrize("device, res, batch, compiled, name, sources, fused", list(_cases()))
def test_train_step(benchmark, request, device, res, batch, compiled, name, sources, fused):
    if _IMPORT_ERROR:
        pytest.skip(_IMPORT_ERROR)
    if compiled and device == "cpu" and not request.config.getoption("--bench-cpu-compile"):
        pytest.skip("torch.compile on CPU runs with --bench-cpu-compile only (compilation is slow on 2 cores)")
    backend = None
    if fused:
        from hires_kernels import backends

        backend = backends.resolve_backend(None, torch.device(device))
        if backend == "reference":
            pytest.skip(f"no fused backend available on {device} (fused=True would run the reference "
                        f"composition): {backends.unavailable_reason('cpu' if device == 'cpu' else 'cuda', device)}")
    gpu = device == "cuda"
    torch.manual_seed(0)
    model = build_model(name, sources, fused).to(device)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    if compiled:
        torch._dynamo.reset()
        model = torch.compile(model)
    step = make_train_step(model, device, res, batch, torch.bfloat16 if gpu else torch.float32, gpu)

    info = benchmark.extra_info
    info.update(level="model", device=device, model=variant_label(name, sources, fused), name=name,
                sources=sources, fused=fused, backend=backend, compiled=compiled, res=res, batch=batch,
                dtype="bf16cl" if gpu else "fp32", threads=torch.get_num_threads(),
                params=sum(p.numel() for p in model.parameters()))
    info.update(_util.run_benchmark(benchmark, step, device, request.config,
                                    warmup_calls=5 if compiled else 2))
    info["images_per_s"] = batch / (info["ms"] * 1e-3)
    if gpu:
        info["peak_mem_bytes"] = _util.cuda_peak_bytes(step, device)
    key = ("model", device, res, batch, compiled)
    _util.record(key, "resnet18" if name == "resnet18" else info["model"], info["ms"], info)
    base = _util.RESULTS.get(key, {}).get("resnet18")
    if base:
        info["ratio_to_resnet18"] = info["ms"] / base
