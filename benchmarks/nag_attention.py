"""Where NAG's shared-image-keys merge pays on the CPU: one NAG layer's attention on the token path, the image
queries and both texts' queries attending [image ; positive text] and [image ; negative text], computed

- "two calls": two default SDPA calls, one per text;
- "shared": every query's attention over the image keys once, merged by log-sum-exp with its attention over its
  own text (`hooks.nag_tokens_flux.image_first_attention_sharing_image_keys`, what SD3's processor runs);

side by side with one stock SDPA call over [image ; positive text] for scale and one over [image ; positive text ;
negative text] ("appended": the attention of a stock call with the negative text appended, the token path's floor),
at growing image-token counts.
`nag_tokens_flux.SHARED_IMAGE_KEYS_FROM` (the image tokens from which the token path takes the merge) comes from
this crossover. Microseconds per layer call, best of --repeats runs of --calls calls.

Run:  python benchmarks/nag_attention.py [--threads 1] [--image-tokens 64 96 128 192 256 1024] [--text-tokens 41]
                                         [--batch 2] [--heads 6] [--head-dim 32]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import dit_attn.processors  # noqa: F401  (imports the hooks in their order)
from dit_attn.hooks import nag_tokens_flux


def microseconds(run, calls: int, repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[64, 96, 128, 192, 256, 1024])
    parser.add_argument("--text-tokens", type=int, default=41, help="tokens of each text (the tiny model's 41)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, {args.heads} heads × "
          f"{args.head_dim}, {args.text_tokens} tokens each text, float32; µs per layer call, best of {args.repeats}; "
          f"SHARED_IMAGE_KEYS_FROM = {nag_tokens_flux.SHARED_IMAGE_KEYS_FROM}")
    print(f"{'image tokens':>12} {'stock call':>11} {'appended':>9} {'two calls':>10} {'shared':>10} {'shared / two':>13} "
          f"{'two / appended':>15}")
    for image in args.image_tokens:
        def tensors(tokens):
            return [torch.randn(args.batch, args.heads, tokens, args.head_dim, generator=generator) for _ in range(3)]
        image_qkv, positive_text, negative_text = tensors(image), tensors(args.text_tokens), tensors(args.text_tokens)
        positive = [torch.cat([x, t], dim=2) for x, t in zip(image_qkv, positive_text)]
        negative = [torch.cat([x, t], dim=2) for x, t in zip(image_qkv, negative_text)]
        appended = [torch.cat([x, t], dim=2) for x, t in zip(positive, negative_text)]
        two = (F.scaled_dot_product_attention(*positive), F.scaled_dot_product_attention(*negative))
        shared = nag_tokens_flux.image_first_attention_sharing_image_keys(positive, negative, image)
        error = max((a - b).abs().max().item() for a, b in zip(two, shared))
        if error > 1e-4:
            raise SystemExit(f"the merge differs from two calls by {error:.2e} at {image} image tokens")
        stock = microseconds(lambda: F.scaled_dot_product_attention(*positive), args.calls, args.repeats)
        floor = microseconds(lambda: F.scaled_dot_product_attention(*appended), args.calls, args.repeats)
        two_calls = microseconds(lambda: (F.scaled_dot_product_attention(*positive),
                                          F.scaled_dot_product_attention(*negative)), args.calls, args.repeats)
        merged = microseconds(lambda: nag_tokens_flux.image_first_attention_sharing_image_keys(positive, negative, image),
                              args.calls, args.repeats)
        print(f"{image:>12} {stock:>11.0f} {floor:>9.0f} {two_calls:>10.0f} {merged:>10.0f} {merged / two_calls:>12.2f}x "
              f"{two_calls / floor:>14.2f}x")


if __name__ == "__main__":
    main()
