import torch
import transformers

from ftnb import env


def test_report_has_every_field():
    r = env.report(show=False)
    assert r.device in ("cpu", "cuda", "mps")
    assert r.cpu_cores >= 1 and r.ram_total_gib > 0
    assert set(env.LIBRARIES) <= set(r.versions)
    assert (r.versions["torch"], r.versions["transformers"]) == (torch.__version__, transformers.__version__)
    assert ["version.torch", torch.__version__] in [line.split() for line in str(r).splitlines()]


def test_pick_dtype_matches_hardware():
    dtype = env.pick_dtype()
    if not torch.cuda.is_available():
        assert dtype == torch.float32 and not env.native_bf16()
    else:  # bf16 only where compute capability >= 8, never by emulation (T4)
        assert dtype == (torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16)


def test_seed_everything_repeats():
    env.seed_everything(3)
    a = torch.rand(4)
    env.seed_everything(3)
    assert torch.equal(a, torch.rand(4))
