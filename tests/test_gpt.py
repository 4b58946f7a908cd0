import pytest
import torch
import torch.nn.functional as F

from nanochat import gpt, kernels
from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig


def make_model(seed=0, **kw):
    cfg = dict(sequence_len=32, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    model.init_weights(seed=seed)
    # c_proj starts at zero (blocks are the identity); perturb so the tests see attention at work
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_from_depth_dial():
    c = GPTConfig.from_depth(20, vocab_size=65536, sequence_len=2048)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head) == (20, 1280, 10, 10)
    c = GPTConfig.from_depth(4, vocab_size=4096, sequence_len=256)
    assert c.n_embd % c.n_head == 0 and c.n_embd // c.n_head == 128


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4, n_embd=768)
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(window_pattern="SX")


def test_shapes_and_loss():
    model = make_model()
    idx = torch.randint(0, 97, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 97) and logits.dtype == torch.float32
    assert logits.abs().max() <= model.config.logit_softcap
    loss = model(idx, idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    per_tok = model(idx, idx, loss_reduction="none")
    assert per_tok.shape == (2, 16)
    torch.testing.assert_close(per_tok.mean(), loss)
    masked = idx.clone()
    masked[:, :8] = -1
    torch.testing.assert_close(model(idx, masked), per_tok[:, 8:].mean())


def test_initial_loss_is_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights(seed=0)
    idx = torch.randint(0, 97, (4, 32))
    assert abs(model(idx, idx).item() - torch.log(torch.tensor(97.0)).item()) < 0.05


@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_causality(pattern):
    model = make_model(window_pattern=pattern, sliding_window=4)
    idx = torch.randint(0, 97, (1, 20))
    base = model(idx)
    changed = idx.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 97
    out = model(changed)
    torch.testing.assert_close(out[:, :12], base[:, :12])  # the past does not see the future
    assert not torch.allclose(out[:, 12:], base[:, 12:])


def test_sliding_window_limits_receptive_field():
    # all layers sliding (window 2) but the last, which is always full context
    model = make_model(window_pattern="S", sliding_window=2, n_layer=3)
    assert model.windows[:2] == [2, 2] and model.windows[2] > 1000
    # with a single S layer + full last layer, changing token 0 must still reach position 10
    # (through the full layer), while in the first layer alone position 10 sees only tokens 9-10
    idx = torch.randint(0, 97, (1, 12))
    changed = idx.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 97
    assert not torch.allclose(model(idx)[:, 10], model(changed)[:, 10])


@pytest.mark.parametrize("batch,pattern", [(1, "L"), (3, "L"), (2, "SSL")])
def test_kv_cache_matches_full_forward(batch, pattern):
    model = make_model(window_pattern=pattern, sliding_window=5)
    idx = torch.randint(0, 97, (batch, 24))
    full = model(idx)
    cache = KVCache.for_model(model, batch, 24)
    prefill = model(idx[:, :10], kv_cache=cache)  # prefill 10 tokens, then decode one at a time
    steps = [prefill] + [model(idx[:, t : t + 1], kv_cache=cache) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.pos == 24


def test_kv_cache_chunked_prefill_and_expand():
    model = make_model()
    idx = torch.randint(0, 97, (1, 20))
    full = model(idx)
    cache = KVCache.for_model(model, 1, 20)
    a = model(idx[:, :7], kv_cache=cache)
    b = model(idx[:, 7:15], kv_cache=cache)  # a multi-token chunk after a prefix
    torch.testing.assert_close(torch.cat([a, b], 1), full[:, :15], atol=1e-5, rtol=0)
    wide = cache.expand(3)
    out = model(idx[:, 15:16].expand(3, 1), kv_cache=wide)
    for row in out:
        torch.testing.assert_close(row, full[0, 15:16], atol=1e-5, rtol=0)


def test_meta_init_matches_eager():
    cfg = GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    eager = GPT(cfg)
    eager.init_weights(seed=3)
    with torch.device("meta"):
        lazy = GPT(cfg)
    lazy.to_empty(device="cpu")
    lazy.init_weights(seed=3)
    for (n1, p1), (_, p2) in zip(eager.state_dict().items(), lazy.state_dict().items()):
        torch.testing.assert_close(p1, p2, msg=n1)
    torch.testing.assert_close(eager.cos, lazy.cos)


def test_estimate_flops_counts_matmuls():
    model = make_model()
    c = model.config
    matmul = model.num_params() - c.vocab_size * c.n_embd
    assert model.estimate_flops() == 6 * matmul + 12 * c.n_embd * c.sequence_len * c.n_layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_close_to_fp32():
    model = make_model()
    idx = torch.randint(0, 97, (2, 16))
    ref = model(idx)
    out = model.cuda()(idx.cuda()).cpu()
    assert (out - ref).abs().max() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlashAttention-3 runs on Hopper only)")
def test_flash_attention_3_matches_sdpa():
    import nanochat.gpt as gpt

    if gpt._fa3_func is None or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("flash_attn_interface (FlashAttention-3) not installed or not a Hopper GPU")
    torch.manual_seed(0)
    q = torch.randn(2, 128, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
    for window in (1 << 62, 32):
        fa3 = gpt.attention(q, k, v, window)
        saved, gpt._fa3_func = gpt._fa3_func, None
        try:
            sdpa = gpt.attention(q, k, v, window)
        finally:
            gpt._fa3_func = saved
        assert (fa3.float() - sdpa.float()).abs().max() < 2e-2


def _plain_head_loss(x, weight, targets, softcap, reduction):
    logits = F.linear(x, weight).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


@pytest.mark.parametrize("softcap", [15.0, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_head_matches_plain_loss_and_gradients(monkeypatch, softcap, reduction):
    # small chunk budgets so that 37 rows split into several chunks and sub-blocks with ragged ends
    monkeypatch.setattr(kernels, "HEAD_CHUNK_ELEMENTS", 10 * 53)
    monkeypatch.setattr(kernels, "HEAD_SUBBLOCK_ELEMENTS", 3 * 53)
    torch.manual_seed(0)
    x = torch.randn(37, 16, dtype=torch.float64).float().requires_grad_()
    weight = (3 * torch.randn(53, 16)).requires_grad_()  # large logits: the soft-cap matters
    targets = torch.randint(0, 53, (37,))
    targets[[0, 11, 12, 36]] = -1
    grads = []
    for fn in (_plain_head_loss, kernels.linear_cross_entropy):
        x.grad = weight.grad = None
        loss = fn(x, weight, targets, softcap, reduction)
        (2.5 * loss).backward()  # a non-unit upstream gradient
        grads.append((loss.detach(), x.grad.clone(), weight.grad.clone()))
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert grads[1][1][[0, 11, 12, 36]].abs().max() == 0  # ignored rows get no gradient


def test_fused_head_no_grad_per_token():
    torch.manual_seed(1)
    x, weight = torch.randn(20, 8), torch.randn(40, 8)
    targets = torch.randint(0, 40, (20,))
    targets[5] = -1
    with torch.no_grad():
        per_tok = kernels.linear_cross_entropy(x, weight, targets, 15.0, "none")
        ref = _plain_head_loss(x, weight, targets, 15.0, "none")
    torch.testing.assert_close(per_tok, ref)
    with pytest.raises(ValueError, match="reduction"):
        kernels.linear_cross_entropy(x, weight, targets, 15.0, "max")


def _rope_reference(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_hand_written_backward_matches_autograd_of_plain_expressions(dtype, tol):
    """norm / relu_squared / apply_rotary_emb carry their own backward; eager autograd of the
    plain expressions (what torch.compile uses) is the reference, values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 16, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    cos, sin = torch.randn(1, 8, 1, 8, dtype=dtype), torch.randn(1, 8, 1, 8, dtype=dtype)
    cases = [
        (kernels.norm, lambda t: F.rms_norm(t, (t.size(-1),), eps=torch.finfo(t.dtype).eps)),
        (kernels.relu_squared, lambda t: F.relu(t).square()),
        (lambda t: kernels.apply_rotary_emb(t, cos, sin), lambda t: _rope_reference(t, cos, sin)),
    ]
    for fn, ref in cases:
        y, y_ref = fn(x), ref(x)
        (dx,), (dx_ref,) = torch.autograd.grad(y, x, dy), torch.autograd.grad(y_ref, x, dy)
        assert y.dtype == y_ref.dtype == dtype
        torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(dx, dx_ref, atol=tol, rtol=tol)


def test_hand_written_backward_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(1, 5, 1, 4, dtype=torch.float64), torch.randn(1, 5, 1, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(kernels.norm, (x,))
    assert torch.autograd.gradcheck(kernels.relu_squared, (x,))
    assert torch.autograd.gradcheck(lambda t: kernels.apply_rotary_emb(t, cos, sin), (x,))


def test_residual_dropout_acts_in_train_mode_only():
    model = make_model()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.train()(idx)
        assert torch.equal(model.set_dropout(0.0)(idx), plain)  # p = 0: the same model
        model.set_dropout(0.3)
        torch.manual_seed(1)
        a = model(idx)
        torch.manual_seed(2)
        b = model(idx)
        assert not torch.allclose(a, plain) and not torch.allclose(a, b)  # a fresh mask per forward
        torch.testing.assert_close(model.eval()(idx), plain)  # eval mode: no dropout
    with pytest.raises(ValueError, match="dropout 1.0 is not in"):
        model.set_dropout(1.0)
