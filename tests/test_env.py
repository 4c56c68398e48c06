import pytest
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


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_only_where_the_cpu_has_bf16_instructions(monkeypatch, native):
    monkeypatch.setattr(env, "device_type", lambda: "cpu")
    monkeypatch.setattr(env, "cpu_native_bf16", lambda: native)
    assert env.pick_dtype() == torch.float32  # never without asking
    assert env.pick_dtype(cpu_bf16=True) == (torch.bfloat16 if native else torch.float32)
    flags = env.precision_flags(env.pick_dtype(cpu_bf16=True))
    assert flags == ({"bf16": True, "fp16": False, "use_cpu": True} if native else {"bf16": False, "fp16": False})
    assert env.precision_flags() == {"bf16": False, "fp16": False}


@pytest.mark.skipif(torch.cuda.is_available() or not env.cpu_native_bf16(), reason="needs a CPU with bf16 instructions")
def test_the_trainer_accepts_bf16_on_a_cpu(tmp_path):
    args = transformers.TrainingArguments(str(tmp_path), report_to="none",
                                          **env.precision_flags(env.pick_dtype(cpu_bf16=True)))
    assert args.bf16 and args.use_cpu
