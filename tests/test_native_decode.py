"""The int8 decode step in C (lora_core.native_decode, kernels/decode_step.c) against the torch step
(fast_decode.decode_step) forced onto an activation-quantizing path (the same numerics: int8 activations per
row, exact int32 products, LLM.int8 outliers in fp32), on odd shapes, GQA, left padding and outliers; the
VNNI and AVX2 kernels against each other; its prefill against the plain model's; real SmolLM2 greedy decoding;
and when it must not be used."""
import contextlib

import pytest
import torch
from test_kv_cache import tiny

from lora_core import fast_decode, native_decode
from lora_core.batch_generation import generate_batch, left_pad
from lora_core.fast_decode import StaticDecoder, decode_step
from lora_core.generation import generate, output_head
from lora_core.int4 import Int4Linear, quantize_model_int4
from lora_core.kernels import cpu_info, dispatch
from lora_core.lora import apply_lora
from lora_core.quant import Int8Linear, add_int8_output_head, quantize_model
from lora_core.sampling import Sampling

GREEDY = Sampling(0, 0, 1.0, 1.0)
WHY = native_decode.library()[1]
pytestmark = pytest.mark.skipif(native_decode.library()[0] is None, reason=f"the C decode step: {WHY}")
# the torch side: int_mm where the CPU has int8 units, else the plain-torch reference (int64 products)
TORCH_PATH = "forward=int_mm" if cpu_info.has_int8_dot() else "forward=reference"


def int8_tiny(outliers=False, int4=False, group=32, **kw):
    model = tiny(**kw)
    if outliers:  # norms large enough that many normalised activations pass the 6.0 threshold
        with torch.no_grad():
            for b in model.layers:
                b.input_layernorm.weight.mul_(8)
                b.post_attention_layernorm.weight.mul_(8)
    model = quantize_model_int4(model, group) if int4 else quantize_model(model)
    add_int8_output_head(model)
    return model, output_head(model)


def both_steps(model, head, prompts, steps=6):
    """Prefill left-padded prompts, then `steps` teacher-forced steps; each step runs the C step and the torch
    step from the same cache. -> (C logits, torch logits), each (steps, B, vocab)."""
    tokens, mask, positions = left_pad(prompts, 0)
    B, T = tokens.shape
    d = StaticDecoder(model, head)
    out_c, out_t = [], []
    with torch.no_grad():
        d.begin(B, T + steps)
        assert d.native is not None, native_decode.why_not(model, head, d.fused)
        d.prefill(tokens, mask, positions)
        nxt, pos = (tokens[:, -1:] * 7 + 3) % model.args.vocab_size, positions[:, -1:] + 1
        for _ in range(steps):
            k, v = [t.clone() for t in d.cache.k], [t.clone() for t in d.cache.v]
            slot = torch.tensor([d.cache.pos])
            with dispatch.forcing(TORCH_PATH):
                out_t.append(decode_step(model, head, k, v, nxt, slot, pos, d.key_valid, d.rope, d.fused))
            out_c.append(d.step(nxt, pos))
            for a, b in zip(d.cache.k + d.cache.v, k + v):  # the new key and value went to the same slot
                assert (a - b).abs().max() <= 0.5 * b.abs().max()  # flips: up to 12% seen; a wrong slot: 100%
                a.copy_(b)
            nxt, pos = out_t[-1].argmax(-1, keepdim=True), pos + 1
    return torch.stack(out_c), torch.stack(out_t)


def assert_close_int8(c, t, median=0.01):
    """Equal up to fp32 summation order, which now and then moves one activation across a rounding boundary of
    its int8 grid (one level of one element, or a feature in or out of the outliers at the 6.0 threshold, which
    rescales its row): that moves a step's logits by up to 1% on tiny models and 9% on SmolLM2's 30 layers, and
    most steps not at all. So: every step within 20% of the largest logit, the median step within 1%. A real
    fault (a wrong slot, head, rotation or scale) is off by the logits' own size at every step."""
    per_step = ((c - t).abs().amax((1, 2)) / t.abs().amax((1, 2))).tolist()
    assert max(per_step) <= 0.2, per_step
    assert sorted(per_step)[len(per_step) // 2] <= median, per_step


@pytest.mark.parametrize("dim,n_heads,n_kv_heads,hidden", [(48, 6, 2, 80), (72, 4, 4, 200), (100, 5, 1, 130),
                                                           (128, 8, 2, 256), (128, 2, 1, 96), (160, 2, 1, 200)])
def test_native_step_equals_torch_step(dim, n_heads, n_kv_heads, hidden):
    """Odd widths (K not a multiple of 32 or 64: the kernels' tails), MHA, GQA and MQA, head_dim 64 and 80 (the
    attention's 64-wide register path and its remainder), one row."""
    model, head = int8_tiny(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden)
    c, t = both_steps(model, head, [[5, 6, 7, 8]])
    assert_close_int8(c, t)


@pytest.mark.parametrize("pack", ["1", "0"])
@pytest.mark.parametrize("dim,n_heads,n_kv_heads,hidden,group", [(64, 4, 2, 96, 32), (96, 6, 1, 160, 32),
                                                                 (128, 4, 2, 192, 64)])
def test_native_int4_step_equals_torch_step(monkeypatch, dim, n_heads, n_kv_heads, hidden, group, pack):
    """int4 projections (the torch step runs the C product of the layer as stored, layer by layer), int8 head,
    prompts of 1-4 rows; the step reads the packed copies (VNNI, pack 1) or the layers as stored."""
    monkeypatch.setenv(native_decode.PACK_ENV, pack)
    model, head = int8_tiny(int4=True, group=group, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                            hidden_dim=hidden)
    assert isinstance(model.layers[0].mlp.down_proj, Int4Linear)
    for prompts in ([[5, 6, 7, 8]], [[5, 6], [7], [8, 9, 10], [11, 12, 13, 14]]):
        c, t = both_steps(model, head, prompts)
        assert_close_int8(c, t)


def test_native_step_takes_outliers_out_as_torch_does():
    model, head = int8_tiny(outliers=True, dim=72, n_heads=4, n_kv_heads=2, hidden_dim=96)
    x = model.layers[0].input_layernorm(model.embed_tokens(torch.arange(8)))
    assert (x.abs() > Int8Linear.threshold).any()  # the test means something: outliers exist
    c, t = both_steps(model, head, [[5, 6, 7, 8, 9]])
    assert_close_int8(c, t)


@pytest.mark.parametrize("prompts", [[[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]],
                                     [[5, 6], [7], [8, 9, 10], [11, 12, 13, 14], [15, 16]]])  # rows in fours, + 1
def test_native_step_on_left_padded_rows(monkeypatch, prompts):
    """Rows of different prompt lengths; threshold 0 (no outliers), where torch's column-wise outlier choice
    and ours per row agree."""
    monkeypatch.setattr(Int8Linear, "threshold", 0.0)
    model, head = int8_tiny(dim=72, n_heads=6, n_kv_heads=3, hidden_dim=96)
    c, t = both_steps(model, head, prompts)
    assert_close_int8(c, t)


def both_prefills(model, head, prompts):
    """The left-padded prompts prefilled by the C step and by the plain model (on TORCH_PATH) ->
    [(logits (B, vocab), KVCache)] for each, C first."""
    tokens, mask, positions = left_pad(prompts, 0)
    out = []
    for plain in (False, True):  # a forced int8 path keeps the C step out
        d = StaticDecoder(model, head)
        with torch.no_grad(), dispatch.forcing(TORCH_PATH) if plain else contextlib.nullcontext():
            d.begin(*tokens.shape)
            assert (d.native is None) == plain
            out.append((d.prefill(tokens, mask, positions), d.cache))
    return out


@pytest.mark.parametrize("int4,prompts", [(False, [[5, 6, 7, 8, 9, 10, 11]]),
                                          (False, [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18, 19]]),
                                          (True, [[5, 6, 7], [8, 9, 10, 11, 12, 13]])])
def test_native_prefill_equals_the_plain_models(monkeypatch, int4, prompts):
    """The prompt through the C step (all tokens of all rows per call, causal within it): the last position's
    logits and every valid key and value in the cache close to the plain model's (threshold 0, where torch's
    column-wise outliers and ours per row agree)."""
    monkeypatch.setattr(Int8Linear, "threshold", 0.0)
    model, head = int8_tiny(int4=int4, dim=72, n_heads=6, n_kv_heads=2, hidden_dim=96)
    (c, cc), (t, tc) = both_prefills(model, head, prompts)
    assert_close_int8(c[None], t[None])
    _, mask, _ = left_pad(prompts, 0)
    valid = mask.bool()[:, None, :, None].expand_as(cc.k[0][:, :, :mask.shape[1]])
    for ours, theirs in zip(cc.k + cc.v, tc.k + tc.v):
        a, b = ours[:, :, :mask.shape[1]][valid], theirs[:, :, :mask.shape[1]][valid]
        assert (a - b).abs().max() <= 0.05 * b.abs().max()


def test_native_prefill_in_chunks_equals_it_whole(monkeypatch):
    """A prompt in chunks of one token per row per call gives the same logits and cache, bit for bit."""
    model, head = int8_tiny(outliers=True, dim=72, n_heads=6, n_kv_heads=2, hidden_dim=96)
    tokens, mask, positions = left_pad([[5, 6, 7], [8, 9, 10, 11, 12, 13]], 0)
    runs = []
    for rows in (fast_decode.PREFILL_ROWS, tokens.shape[0]):
        monkeypatch.setattr(fast_decode, "PREFILL_ROWS", rows)
        d = StaticDecoder(model, head)
        with torch.no_grad():
            d.begin(*tokens.shape)
            runs.append((d.prefill(tokens, mask, positions), d.cache))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1].k + runs[0][1].v, runs[1][1].k + runs[1][1].v))


def test_long_prompts_prefill_through_the_plain_model(monkeypatch):
    """Past NATIVE_PREFILL_MAX tokens the plain model prefills (its attention is faster there); decoding stays C."""
    monkeypatch.setattr(fast_decode, "NATIVE_PREFILL_MAX", 3)
    model, head = int8_tiny(dim=72, n_heads=6, n_kv_heads=2, hidden_dim=96)
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    runs = []
    for native in (True, False):
        d = StaticDecoder(model, head)
        with torch.no_grad():
            d.begin(*tokens.shape)
            if not native:
                d.native = None
            runs.append(d.prefill(tokens))
    assert torch.equal(runs[0], runs[1])
    assert native_decode.why_not(model, head, d.fused) is None


@pytest.mark.parametrize("pack", ["1", "0"])
@pytest.mark.parametrize("dim,n_heads,hidden", [(100, 5, 130), (90, 5, 131)])  # 90: q|k|v 126 and o 90 rows
def test_vnni_and_avx2_kernels_agree_bit_for_bit(monkeypatch, dim, n_heads, hidden, pack):
    """The VNNI kernels against AVX2's (tiles of 2 weight rows x 4 rows, leftover rows one dot product at a time),
    with outliers, one row and five. VNNI batches read the packed copies (pack 1: 32 weight rows x 8 rows, N and
    K padded; K here 90-131, never a multiple of 64, and N never of 32), or tiles of 4 weight rows x 4 rows of
    the weights as stored (pack 0)."""
    if not (cpu_info.has("avx512_vnni") and cpu_info.has("avx512_bw")):
        pytest.skip(f"needs AVX-512 VNNI to compare with AVX2; this CPU: {cpu_info.flags_summary()}")
    monkeypatch.setenv(native_decode.PACK_ENV, pack)
    model, head = int8_tiny(outliers=True, dim=dim, n_heads=n_heads, n_kv_heads=1, hidden_dim=hidden)
    runs = []
    for isa in (native_decode.ISA_VNNI, native_decode.ISA_AVX2):
        monkeypatch.setattr(native_decode, "isa", lambda isa=isa: isa)
        runs.append(torch.cat([both_steps(model, head, p)[0].flatten()  # one row: torch's outlier columns are ours
                               for p in ([[5, 6, 7, 8]], [[5, 6], [7], [8, 9, 10], [11, 12, 13, 14], [15, 16]])]))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("int4", [False, True])
def test_batched_rows_decode_as_each_row_alone(int4):
    """Each row computed on its own (int8 outliers chosen per row, int4 activations quantized per row): a row's
    greedy answer does not depend on its batch."""
    model, head = int8_tiny(outliers=True, int4=int4, dim=72, n_heads=6, n_kv_heads=2, hidden_dim=96)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    tok = _Tok()
    batched = generate_batch(model, tok, prompts, GREEDY, max_new_tokens=8, ignore_eos=True)
    assert all(g.native for g in batched)
    for p, g in zip(prompts, batched):
        assert generate(model, tok, p, GREEDY, max_new_tokens=8, ignore_eos=True).token_ids == g.token_ids


class _Tok:
    """Just enough tokenizer for generate() on a random model: ids as text."""
    eos_id, pad_id = 0, 0

    def stream(self):
        class S:
            def put(self, i):
                return f"{i} "

            def flush(self):
                return ""
        return S()


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_smollm2_native_step_equals_torch_step(smollm2_path, dtype):
    """Real weights: the C prefill close to the plain model's; 16 teacher-forced steps close to the torch step's,
    greedy choices the same but at near-ties.
    int8 where the torch side is torch._int_mm (same float scaling order): 24 free-running greedy tokens equal too.
    Not elsewhere: the int64 reference's double scaling (CPUs without int8 units), or int4's sensitivity, moves a
    rounding boundary now and then, and free-running tokens may part after a near-tie."""
    import lora_core

    model, tok = lora_core.load(smollm2_path, dtype=dtype)
    ids = tok.encode("Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\n\n### Instruction:\nName three rivers in China.\n\n### Response:\n")
    c, t = (r[0] for r in both_prefills(model, output_head(model), [ids, tok.encode("Who wrote Hamlet?")]))
    assert_close_int8(c[None], t[None], median=0.2)  # the prompts (one left-padded): 4-15% apart measured
    assert torch.equal(c.argmax(-1), t.argmax(-1))
    c, t = both_steps(model, output_head(model), [ids], steps=16)
    # int4 SmolLM2 (weights from the Q4_1 file: values on a grid, so activations land on rounding ties) moves the
    # torch step's own logits by 4-9% when its embeddings are scaled by 1 + 1e-7 (measured): no median bound there
    assert_close_int8(c, t, median=0.01 if dtype == "int8" else 0.2)
    pick = c.argmax(-1, keepdim=True)  # a different greedy choice only at a near-tie of the torch step's logits
    assert (t.amax(-1, keepdim=True) - t.gather(-1, pick) <= 0.2 * t.abs().amax(-1, keepdim=True)).all()
    assert (pick == t.argmax(-1, keepdim=True)).float().mean() >= 0.85
    native = generate(model, tok, ids, GREEDY, max_new_tokens=24, ignore_eos=True)
    assert native.native and "native C step" in native.speed()
    if TORCH_PATH == "forward=int_mm" and dtype == "int8":  # int4 is too sensitive to summation order (above)
        with dispatch.forcing(TORCH_PATH):
            torch_step = generate(model, tok, ids, GREEDY, max_new_tokens=24, ignore_eos=True)
        assert not torch_step.native
        assert native.token_ids == torch_step.token_ids


def test_when_the_torch_step_runs(monkeypatch):
    model, head = int8_tiny()
    d = StaticDecoder(model, head)
    d.begin(1, 4)
    assert d.native is not None
    monkeypatch.setenv(native_decode.ENV, "0")
    assert native_decode.why_not(model, head, d.fused) == f"{native_decode.ENV}=0"
    monkeypatch.delenv(native_decode.ENV)
    with dispatch.forcing("forward=reference"):
        assert "forced" in native_decode.why_not(model, head, d.fused)
    assert "int8" in native_decode.why_not(model, model.lm_head, d.fused)  # a float head
    float_model = tiny()
    d = StaticDecoder(float_model, float_model.lm_head)
    d.begin(1, 4)
    assert d.native is None
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"))  # an unmerged adapter: the torch step, exact
    d = StaticDecoder(model, head)
    d.begin(1, 4)
    assert d.native is None
    assert "adapter" in native_decode.why_not(model, head, d.fused)


def test_row_sums_follow_weights_written_in_place():
    """The VNNI kernel's x + 128 correction uses each weight row's sum, and batches the packed copy, both kept on
    the layer: a weight written in place (load_state_dict, copy_) keeps its address, so they must notice."""
    _, head = int8_tiny()
    first, packed = native_decode._rowsum(head).clone(), native_decode._packed(head).clone()
    with torch.no_grad():
        head.qweight.neg_()
    assert torch.equal(native_decode._rowsum(head), -first)
    assert torch.equal(native_decode._packed(head), -packed)
    with torch.inference_mode():  # layers made in inference mode have no version counter: still summed
        made_there = Int8Linear.from_float(torch.randn(8, 64))
    assert torch.equal(native_decode._rowsum(made_there), made_there.qweight.sum(1, dtype=torch.int32))


@pytest.mark.parametrize("N,K", [(32, 64), (50, 90), (7, 3), (96, 131)])
def test_packed_layout_by_hand(N, K):
    """Weight (n, k) sits in block n // 16 at [k // 4, n % 16, k % 4]; the padding is zeros."""
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    p = native_decode.pack_vnni(w)
    assert p.shape == (-(-N // 32) * 2, -(-K // 4), 16, 4)
    n, k = torch.meshgrid(torch.arange(N), torch.arange(K), indexing="ij")
    assert torch.equal(p[n // 16, k // 4, n % 16, k % 4], w)
    assert int(p.abs().sum()) == int(w.abs().sum())  # nothing else is non-zero


@pytest.mark.parametrize("N,K,group", [(16, 32, 32), (50, 96, 32), (7, 128, 64)])
def test_packed_int4_layout_by_hand(N, K, group):
    """Row n's weight k: block n // 16, 32 features k // 32, part (k % 16) // 4, byte 4 (n % 16) + k % 4, in the low
    nibble for k % 32 < 16; then the scales and the minima, (N / 16, groups, 16) each; padding zeros."""
    from lora_core.int4 import pack
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    scale, lo = torch.rand(N, K // group), torch.randn(N, K // group)
    p = native_decode.pack_int4_vnni(pack(q), scale, lo)
    blocks = -(-N // 16)
    parts = p[:blocks * 16 * K // 2].reshape(blocks, K // 32, 4, 64)
    n, k = torch.meshgrid(torch.arange(N), torch.arange(K), indexing="ij")
    byte = parts[n // 16, k // 32, (k % 16) // 4, 4 * (n % 16) + k % 4]
    assert torch.equal(torch.where(k % 32 < 16, byte & 15, byte >> 4), q)
    tables = p[blocks * 16 * K // 2:].view(torch.float32).reshape(2, blocks, K // group, 16)
    for table, t in zip(tables, (scale, lo)):
        assert torch.equal(table.transpose(1, 2).reshape(blocks * 16, K // group)[:N], t)
        assert not table.transpose(1, 2).reshape(blocks * 16, K // group)[N:].any()


def test_packed_copies_only_with_room_for_them(monkeypatch, capsys):
    """Packing doubles the int8 weights: without room (half of the available memory) or with
    LORA_CORE_NATIVE_PACK=0 batches read the weights as stored, with a one-line notice for the first."""
    if native_decode.isa() != native_decode.ISA_VNNI:
        pytest.skip(f"packed copies are for AVX-512 VNNI; this CPU: {cpu_info.flags_summary()}")
    model, head = int8_tiny()
    fused = fast_decode.fuse_projections(model)
    assert native_decode.packs(model, head, fused)
    monkeypatch.setenv(native_decode.PACK_ENV, "0")
    assert not native_decode.packs(model, head, fused)
    monkeypatch.delenv(native_decode.PACK_ENV)
    assert native_decode.available_memory() > 0
    monkeypatch.setattr(native_decode, "available_memory", lambda: 4096)
    monkeypatch.setattr(native_decode, "_said", set())
    assert not native_decode.packs(model, head, fused)
    assert not native_decode.packs(model, head, fused)  # said once
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "without the packed weight copies" in notice[0]


def test_native_step_refuses_what_its_cache_cannot_hold():
    model, head = int8_tiny()
    d = StaticDecoder(model, head)
    with torch.no_grad():
        d.begin(1, 6)
        d.prefill(torch.tensor([[5, 6, 7]]))
        with pytest.raises(ValueError, match="holds a cache of 1 rows"):
            d.native(torch.tensor([[8], [9]]), 3, torch.tensor([[3], [3]]), d.key_valid)
        with pytest.raises(ValueError, match="RoPE positions must lie in"):
            d.native(torch.tensor([[8]]), 3, torch.tensor([[10_000]]), d.key_valid)
        with pytest.raises(ValueError, match="slot 256"):
            d.native(torch.tensor([[8]]), 256, torch.tensor([[3]]), d.key_valid)
