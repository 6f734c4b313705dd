"""torchrun --standalone --nproc_per_node 2 launch/generate.py --config tiny --prompt-len 512

Greedy generation from one long prompt whose KV cache is spread over the ranks: a random-init
Llama (the same seed on every rank), a random prompt, ring prefill into the sharded paged cache
(zigzag by default), then greedy decoding with one LSE merge across ranks per layer per token.
Prints the tokens, how many of them each rank caches (checked against the policy's closed form),
the prefill time, the per-token decode latency and the cache pages used per rank. gloo on CPU,
NCCL when every rank has a GPU. `--check` also compares the tokens with single-process greedy
decoding by plain full forwards of the same model (cheap for the tiny config).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from ringattn.cache import ShardedKVCache, decode_step, prefill
from ringattn.layout import LAYOUTS
from ringattn.models.llama import CONFIGS, Llama, LlamaConfig
from ringattn.runtime import init_distributed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None, help="per rank (default: enough)")
    p.add_argument("--layout", default="zigzag", choices=LAYOUTS)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (GPU default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="compare with full-forward greedy")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_greedy(model: Llama, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy tokens by full forwards of the model over the growing sequence, no cache."""
    seq, out = prompt[None], []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = model(seq)[:, -1].argmax(-1)  # [1]
            out.append(int(token))
            seq = torch.cat([seq, token[:, None]], dim=1)
    return out


def main() -> None:
    args = parse_args()
    device = init_distributed()
    use_cuda = device.type == "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype or ("bfloat16" if use_cuda else "float32"))

    torch.manual_seed(args.seed)  # the same weights on every rank
    config = LlamaConfig.from_name(args.config)
    model = Llama(config=config).to(device, dtype).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=gen).to(device)
    total = args.prompt_len + args.new_tokens
    # Per rank: its share of the sequence, plus one page of slack for the chunk boundaries.
    num_pages = args.num_pages or -(-total // (world * args.page_size)) + 2
    cache = ShardedKVCache.for_model(model, num_pages=num_pages, page_size=args.page_size)

    # Warm-up: the first ring attention call imports torch's compile stack (seconds).
    warm = prompt[None, : min(args.prompt_len, 4 * world)]
    prefill(model, cache, warm, seq_ids=["warm-up"], layout=args.layout)
    cache.free("warm-up")

    dist.barrier()
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompt[None], seq_ids=["s"], layout=args.layout)  # [1, V]
    sync(device)
    prefill_s = time.perf_counter() - t0

    tokens, latencies = [], []
    for i in range(args.new_tokens):
        token = logits.argmax(-1)  # [1]
        tokens.append(int(token))
        if i + 1 == args.new_tokens:
            break
        t0 = time.perf_counter()
        logits = decode_step(model, cache, token[:, None], seq_ids=["s"])[:, -1]
        sync(device)
        latencies.append(time.perf_counter() - t0)

    local = torch.tensor([cache.local_tokens("s"), cache.pool.allocator.num_used])
    every = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(every, local)
    closed = [cache.tokens_on_rank("s", r) for r in range(world)]
    if [int(e[0]) for e in every] != closed:
        raise RuntimeError(f"rank token counts {every} differ from the closed form {closed}")

    ok = True
    if rank == 0:
        ring_len, _ = cache.split("s")
        print(
            f"# {args.config} ({model.param_count() / 1e6:.2f}M params), {world} ranks, "
            f"{device.type}, {dtype}, layout {args.layout}, page size {args.page_size}, "
            f"{num_pages} pages per rank"
        )
        chunk = args.prompt_len - ring_len
        print(f"prompt tokens     {args.prompt_len} (ring prefill {ring_len}, chunk {chunk})")
        print(f"generated tokens  {tokens}")
        print(f"prefill           {prefill_s * 1e3:.1f} ms")
        if latencies:
            print(
                f"decode per token  {statistics.median(latencies) * 1e3:.2f} ms median, "
                f"{min(latencies) * 1e3:.2f} ms min over {len(latencies)} steps"
            )
        print(f"{'rank':>4} {'tokens':>8} {'pages used':>11}")
        for r, e in enumerate(every):
            print(f"{r:>4} {int(e[0]):>8} {int(e[1]):>11}")
        if args.check:
            expected = reference_greedy(model, prompt, args.new_tokens)
            ok = expected == tokens
            print(
                f"check vs full-forward greedy: {'OK' if ok else f'MISMATCH, expected {expected}'}"
            )
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
