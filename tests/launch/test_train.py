"""launch/train.py under torchrun on 2 CPU ranks: every strategy, activation checkpointing and
the DeepSpeed path print one line per step and reproduce the single-process losses."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringattn.checkpoint import CHOICES
from ringattn.models import Llama, LlamaConfig, causal_lm_loss, shift_labels

ROOT = Path(__file__).resolve().parents[2]
SEQ, BATCH, STEPS, LR = 32, 2, 4, 1e-2
COMMON = ["--config", "tiny", "--seq-len", str(SEQ), "--steps", str(STEPS), "--lr", str(LR)]
COMMON += ["--fixed-batch", "--seed", "0"]
STEP_LINE = re.compile(
    r"^step (\d+)/(\d+) \| loss ([\d.]+) \| ([\d,]+) tok/s \| ([\d.]+) TFLOP/s \| "
    r"peak ([\d.]+) MiB/rank$"
)
# name -> extra arguments; each run holds BATCH sequences in total (dp * --batch)
RUNS = {
    "ring": ["--strategy", "ring", "--batch", str(BATCH)],
    "ulysses": ["--strategy", "ulysses", "--layout", "contiguous", "--batch", str(BATCH)],
    "checkpoint-full": ["--checkpoint", "full", "--layout", "striped", "--batch", str(BATCH)],
    "checkpoint-selective": ["--checkpoint", "selective", "--batch", str(BATCH)],
    "deepspeed": ["--deepspeed", "{ds_json}", "--checkpoint", "deepspeed", "--batch", str(BATCH)],
    "dp2-sp1": ["--sp", "1", "--batch", str(BATCH // 2)],
}
NEEDS_DEEPSPEED = {"ulysses", "deepspeed"}


def _deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every run of RUNS, launched together (each is mostly process start-up) and awaited."""
    ds_json = tmp_path_factory.mktemp("train") / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    names = [n for n in RUNS if n not in NEEDS_DEEPSPEED or _deepspeed_available()]
    if any(n in NEEDS_DEEPSPEED for n in names):
        _build_deepspeed_comm_op()
    procs = {}
    for name in names:
        extra = [a.format(ds_json=ds_json) for a in RUNS[name]]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", "2", "launch/train.py", *COMMON, *extra]
        procs[name] = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return results


def _build_deepspeed_comm_op() -> None:
    """deepspeed.comm JIT-compiles a CPU shared-memory op on first start (minutes, once per
    machine, cached). Build it here, unbounded: a build killed by a rank's timeout leaves a lock
    file that makes every later start wait forever."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load()


@functools.cache
def single_process_losses() -> list[float]:
    """The same training in one process: seed 0 weights, the first seeded batch every step,
    AdamW, gradient norm clipped to 1 (train.py's defaults)."""
    torch.manual_seed(0)
    model = Llama(config=LlamaConfig.from_name("tiny", max_seq_len=SEQ))
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = causal_lm_loss(model(ids), shift_labels(ids))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(RUNS))
def test_train_reproduces_single_process_losses(runs, name):
    if name not in runs:
        pytest.skip("deepspeed is not installed")
    proc = runs[name]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [STEP_LINE.match(line) for line in proc.stdout.splitlines()]
    steps = [m for m in lines if m]
    assert [int(m[1]) for m in steps] == list(range(1, STEPS + 1)), proc.stdout
    losses = [float(m[3]) for m in steps]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3, losses  # one batch, repeated: it is learned
    for m in steps:  # tokens/s, TFLOP/s, peak MiB
        assert float(m[4].replace(",", "")) > 0 and float(m[5]) > 0 and float(m[6]) > 0
    # fp32, exact parallelism: equal up to summation order and the 6 printed decimals
    assert losses == pytest.approx(single_process_losses(), abs=1e-5)
    (header,) = [line for line in proc.stdout.splitlines() if line.startswith("# tiny:")]
    assert ("deepspeed ZeRO-2" in header) == (name == "deepspeed"), header


def _load_train_module():
    spec = importlib.util.spec_from_file_location("train", ROOT / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_file_is_tokenized_bytewise(tmp_path):
    train = _load_train_module()
    path = tmp_path / "text.txt"
    text = b"the quick brown fox jumps over the lazy dog\n" * 4
    path.write_bytes(text)
    args = train.parse_args(["--data", str(path), "--seq-len", "8"])
    batch = train.Batches(args, rows=3, vocab_size=256).next()
    assert batch.shape == (3, 8)
    for row in batch.tolist():
        assert bytes(row) in text
    with pytest.raises(ValueError, match="needs a vocabulary of 256"):
        train.Batches(args, rows=1, vocab_size=128)


def test_every_checkpoint_policy_is_selectable():
    train = _load_train_module()
    for policy in CHOICES:
        assert train.parse_args(["--checkpoint", policy]).checkpoint == policy
    with pytest.raises(SystemExit):
        train.parse_args(["--checkpoint", "most"])
