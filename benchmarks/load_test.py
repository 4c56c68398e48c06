"""Load test of `python -m ftnb serve`: N chat requests at a fixed concurrency against a server on
127.0.0.1 (local only, bounded in count and time), through the `openai` client; writes p50/p95
latency, requests/s, tokens/s, errors and the command line to a JSON file.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/load_test.py              # demo models, 200 requests, 16 at a time
    .venv/bin/python benchmarks/load_test.py --models legal=runs/x/adapter --requests 50 --output /tmp/load.json

Without --models it serves demo models that `save_demo_models` writes to a temporary folder: two
LoRA adapters on SmolLM2-135M-Instruct (fp32, de-quantized Q4_1 offline) with small random
nonzero B matrices, so each answers differently from the base and from the other, and a
SmolLM2 classifier with a random LoRA and head. They measure speed, not quality: the same shapes
and code paths as trained adapters. tests/test_serve.py serves the same models.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import torch

MODEL = "smollm2-135m-instruct"
ADAPTERS = ("legal", "medical")
LABELS = ["billing", "shipping", "technical", "account"]
# Each adapter answers with a repetition penalty on its answer's tokens, as notebook 02's generator does.
ADAPTER_DECODING = {"repetition_penalty": 1.1}
PROMPTS = ["Explain this clause in plain English: the tenant shall pay rent monthly.",
           "Summarise: patient reports mild headache, no fever, two days.",
           "What does a 502 error from a proxy mean?",
           "Rewrite politely: send me the invoice now.",
           "List two risks of a verbal contract.",
           "How should a sprained ankle be treated in the first day?",
           "Why would a database query suddenly become slow?",
           "Give one sentence on what an indemnity clause does."]
OUTPUT = Path(__file__).with_name("load_test_cpu.json")


def save_demo_models(folder: str | Path, seed: int = 0, lora_b_std: float = 0.04) -> dict[str, Path]:
    """Save two generator adapters and one classifier on SmolLM2 (fp32) in ftnb's saved-model
    format, LoRA B drawn from N(0, lora_b_std) (peft starts B at zero, which would make every
    adapter equal to the base). Returns {name: folder}; the classifier is "tickets".

    Usage: folders = save_demo_models(tmp_path); start_server([f"{n}={f}" for n, f in folders.items()])
    """
    from peft import LoraConfig, get_peft_model

    from ftnb.models import load_model, load_tokenizer
    from ftnb.tasks import classify, sft

    folder, folders = Path(folder), {}
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(MODEL)
    lm = get_peft_model(load_model(MODEL, dtype=torch.float32),
                        LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"))
    for name in ADAPTERS:
        _randomise_lora_b(lm, lora_b_std)
        folders[name] = sft.save_generator(lm, tokenizer, folder / name, base_model=MODEL, decoding=ADAPTER_DECODING)
    id2label, label2id = classify.label_maps(LABELS)
    seq_cls = load_model(MODEL, task="seq-cls", dtype=torch.float32, num_labels=len(LABELS), id2label=id2label,
                         label2id=label2id, tokenizer=tokenizer)
    seq_cls = get_peft_model(seq_cls, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules="all-linear",
                                                 modules_to_save=["score"]))
    _randomise_lora_b(seq_cls, lora_b_std)
    folders["tickets"] = classify.Classifier(seq_cls, tokenizer, LABELS, base_model=MODEL, max_length=64,
                                             label_field="category").save(folder / "tickets")
    return folders


def _randomise_lora_b(model, std: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)


async def _one_request(client, semaphore, index: int, model: str, max_tokens: int, deadline: float) -> dict:
    async with semaphore:
        if time.monotonic() > deadline:
            return {"index": index, "model": model, "error": "not sent: the time limit had passed"}
        start = time.perf_counter()
        try:
            answer = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
                max_tokens=max_tokens, temperature=0)
        except Exception as error:  # noqa: BLE001 - every failure is counted and reported, not raised
            return {"index": index, "model": model, "error": f"{type(error).__name__}: {error}"[:300]}
        return {"index": index, "model": model, "latency_s": time.perf_counter() - start,
                "completion_tokens": answer.usage.completion_tokens}


async def _load(url: str, models: list[str], requests: int, concurrency: int, max_tokens: int,
                time_limit_s: float) -> tuple[list[dict], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", timeout=time_limit_s, max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + time_limit_s
    start = time.perf_counter()
    results = await asyncio.gather(*(_one_request(client, semaphore, i, models[i % len(models)], max_tokens, deadline)
                                     for i in range(requests)))
    await client.close()
    return list(results), time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float | None:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else None


def summarise(results: list[dict], wall_s: float) -> dict:
    done = [r for r in results if "error" not in r]
    latencies = sorted(r["latency_s"] for r in done)
    tokens = sum(r["completion_tokens"] for r in done)
    errors = [r["error"] for r in results if "error" in r]
    return {"requests": len(results), "completed": len(done), "errors": len(errors), "error_examples": errors[:5],
            "wall_s": round(wall_s, 2), "requests_per_s": round(len(done) / wall_s, 3),
            "completion_tokens": tokens, "completion_tokens_per_s": round(tokens / wall_s, 1),
            "latency_s": {"p50": _round(_percentile(latencies, 50)), "p95": _round(_percentile(latencies, 95)),
                          "mean": _round(statistics.fmean(latencies)) if latencies else None,
                          "max": _round(max(latencies, default=None))}}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", help="FOLDER or NAME=FOLDER of generators (default: demo models)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--time-limit-s", type=float, default=900, help="no request is sent after this")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    from ftnb.serve import parse_spec, start_server

    with tempfile.TemporaryDirectory(prefix="ftnb-load-") as scratch:
        specs = args.models or [f"{n}={f}" for n, f in save_demo_models(scratch).items() if n in ADAPTERS]
        names = [parse_spec(spec)[0] for spec in specs]
        with start_server(specs, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms) as server:
            results, wall_s = asyncio.run(_load(server.url, names, args.requests, args.concurrency,
                                                args.max_tokens, args.time_limit_s))
            with urllib.request.urlopen(f"{server.root}/health") as answer:
                batching = json.load(answer)["batching"]
    report = {"command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads()},
              "models": names if args.models else [f"{n} (demo adapter on {MODEL}, fp32)" for n in names],
              "settings": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                           "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
                           "temperature": 0},
              **summarise(results, wall_s),
              "server_batching": {**batching,
                                  "mean_batch": round(batching["requests"] / max(batching["batches"], 1), 2)}}
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
