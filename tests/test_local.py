"""CLEAR local attention: kernels against the dense-mask reference, and the edit in pipelines."""
import math

import pytest
import torch
from safetensors.torch import save_file

import dit_attn as da
from dit_attn.kernels import AttentionPlan, LocalWindow, Perturbation, attention
from dit_attn.kernels.window import default_tile, dense_mask, tile_geometry
from tests.conftest import flux_call, sd3_call

LOCAL_BACKENDS = ("tiled", "tiled-unfused", "flex")


@pytest.fixture(autouse=True)
def unfused_tiled(monkeypatch, request):
    """"tiled-unfused": the tiled backend without torch's fused CPU kernel (its path with gradients)."""
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend == "tiled-unfused":
        import dit_attn.kernels.tiled as tiled

        monkeypatch.setattr(tiled, "_flash_with_lse", lambda: None)


def backend_name(backend: str) -> str:
    return "tiled" if backend == "tiled-unfused" else backend


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    """Compiling flex per test shape would take minutes; one test below runs it compiled."""
    monkeypatch.setenv("DIT_ATTN_FLEX_COMPILE", "0")


def brute_force_allowed(rows, cols, radius, text_before, text_after, pooled):
    """Query i may see key j, written out pair by pair from the definition."""
    n = rows * cols
    seq = text_before + n + text_after
    allowed = torch.zeros(seq, seq + pooled, dtype=torch.bool)
    for i in range(seq):
        for j in range(seq + pooled):
            i_img, j_img = text_before <= i < text_before + n, text_before <= j < text_before + n
            if not i_img:
                allowed[i, j] = j < seq
            elif j >= seq or not j_img:
                allowed[i, j] = True
            else:
                (yi, xi), (yj, xj) = divmod(i - text_before, cols), divmod(j - text_before, cols)
                allowed[i, j] = (yi - yj) ** 2 + (xi - xj) ** 2 < radius**2
    return allowed


@pytest.mark.parametrize("rows,cols,radius,before,after,pool", [
    (5, 7, 2.5, 0, 3, None), (4, 4, 1, 2, 0, None), (6, 9, 3, 3, 0, 3), (3, 8, 100, 0, 1, None),
])
def test_dense_mask_is_the_definition(rows, cols, radius, before, after, pool):
    pooled = (rows // pool) * (cols // pool) if pool else 0
    window = LocalWindow(radius, (rows, cols), pool, torch.ones(pool, pool) if pool else None)
    image = slice(before, before + rows * cols)
    got = dense_mask(before + rows * cols + after, image, window)
    assert torch.equal(got, brute_force_allowed(rows, cols, radius, before, after, pooled))


@pytest.mark.parametrize("radius,keys", [(8, 193), (16, 793), (32, 3205)])
def test_window_sizes_away_from_borders(radius, keys):
    geo = tile_geometry((200, 200), float(radius), (8, 8))
    assert int(geo.circle.sum(dim=1).max()) == keys  # a query whose circle fits inside its halo


def random_qkv(batch, heads, seq, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq, dim, generator=g, dtype=dtype) for _ in range(3))


CASES = [  # rows, cols, radius, text tokens, image first (SD3) or text first (FLUX), pool
    (7, 5, 2.5, 13, True, None),
    (9, 11, 1, 5, False, None),
    (13, 6, 3.2, 0, True, None),
    (8, 12, 4, 7, False, 4),
    (16, 16, 8, 9, True, 4),
    (10, 23, 17, 3, False, None),
]


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("rows,cols,radius,text,image_first,pool", CASES)
def test_backend_matches_reference(backend, rows, cols, radius, text, image_first, pool):
    n = rows * cols
    batch, heads = 2, 3
    q, k, v = random_qkv(batch, heads, n + text, 16, seed=rows * 31 + cols)
    image = (0, n) if image_first else (text, n + text)
    weight = torch.rand(pool, pool, generator=torch.Generator().manual_seed(1)) if pool else None
    window = LocalWindow(radius, (rows, cols), pool, weight)
    u = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.3, 0.0]])
    plans = [
        AttentionPlan((), image, window),
        AttentionPlan((Perturbation(u, "identity", "joint"),), image, window),
        AttentionPlan((Perturbation(u, "uniform", "image"), Perturbation(u.flip(0), "identity", "image")), image, window),
    ]
    for plan in plans:
        expected = attention(q, k, v, plan, backend="reference")
        assert (attention(q, k, v, plan, backend=backend_name(backend)) - expected).abs().max() < 1e-5
    # BSHD layout (FLUX) gives the same numbers
    plan = plans[1]
    bshd = attention(*(x.transpose(1, 2) for x in (q, k, v)), plan, layout="BSHD", backend=backend_name(backend))
    assert (bshd.transpose(1, 2) - attention(q, k, v, plan, backend="reference")).abs().max() < 1e-5


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_radius_covering_the_grid_is_stock_attention(backend):
    q, k, v = random_qkv(2, 2, 6 * 7 + 4, 16)
    window = LocalWindow(math.hypot(5, 6) + 0.01, (6, 7))
    assert window.covers_grid()
    out = attention(q, k, v, AttentionPlan((), (4, 46), window), backend=backend_name(backend))
    assert (out - torch.nn.functional.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-6


def test_flex_refuses_gradients_on_the_cpu():
    q, k, v = (x.requires_grad_() for x in random_qkv(1, 1, 16, 8))
    with pytest.raises(ValueError, match="no backward on the CPU"):
        attention(q, k, v, AttentionPlan((), None, LocalWindow(2, (4, 4))), backend="flex")


@pytest.mark.parametrize("backend", ["tiled"])
def test_image_only_attention_and_gradients(backend):
    q, k, v = (x.requires_grad_() for x in random_qkv(1, 2, 6 * 5, 8, dtype=torch.float64))
    plan = AttentionPlan((Perturbation(torch.tensor([[0.4, 0.0]], dtype=torch.float64), "uniform", "joint"),), None,
                         LocalWindow(2, (6, 5)))
    grads = []
    for name in (backend, "reference"):
        out = attention(q, k, v, plan, backend=name)
        grads.append(torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).cos()).sum(), (q, k, v)))
    for ours, theirs in zip(*grads):
        assert (ours - theirs).abs().max() < 1e-10


def test_pooled_keys_follow_the_spatial_weight():
    """Pooled key (cy, cx) = Σ_ij w[i, j]·k[cy·f + i, cx·f + j], written with loops here."""
    rows, cols, f = 4, 6, 2
    q, k, v = random_qkv(1, 1, rows * cols, 4, dtype=torch.float64)
    w = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    grid_k, grid_v = k[0, 0].view(rows, cols, 4), v[0, 0].view(rows, cols, 4)
    pk, pv = [], []
    for cy in range(rows // f):
        for cx in range(cols // f):
            pk.append(sum(w[i, j] * grid_k[cy * f + i, cx * f + j] for i in range(f) for j in range(f)))
            pv.append(sum(w[i, j] * grid_v[cy * f + i, cx * f + j] for i in range(f) for j in range(f)))
    keys, values = torch.cat([k[0, 0], torch.stack(pk)]), torch.cat([v[0, 0], torch.stack(pv)])
    allowed = brute_force_allowed(rows, cols, 1.5, 0, 0, len(pk))
    logits = (q[0, 0] @ keys.T / 2.0).masked_fill(~allowed, float("-inf"))
    expected = torch.softmax(logits, dim=-1) @ values
    for backend in LOCAL_BACKENDS:
        out = attention(q, k, v, AttentionPlan((), None, LocalWindow(1.5, (rows, cols), f, w)), backend=backend_name(backend))
        assert (out[0, 0] - expected).abs().max() < 1e-12


def test_compiled_flex_matches_reference(monkeypatch):
    import dit_attn.kernels.flex as flex

    monkeypatch.setenv("DIT_ATTN_FLEX_COMPILE", "1")
    rows, cols, text = 20, 28, 77  # several 128-token blocks: full, partial and empty block pairs
    q, k, v = random_qkv(1, 2, rows * cols + text, 16)
    u = torch.tensor([[0.0, 0.6]])
    plan = AttentionPlan((Perturbation(u, "uniform", "image"),), (0, rows * cols), LocalWindow(5, (rows, cols), 4, torch.rand(4, 4)))
    out = attention(q, k, v, plan, backend="flex")
    assert not flex._compile_failed, flex._compile_failed
    assert (out - attention(q, k, v, plan, backend="reference")).abs().max() < 1e-5


def test_geometry_is_small_and_cached_per_resolution(monkeypatch):
    """Geometry builds are counted where they happen (the TileGeometry the builder constructs, the
    WindowBlocks flex builds): one per new (grid, radius) and none for a resolution seen before,
    and each call's output still equals the dense-mask reference."""
    import dit_attn.kernels.blocks as blocks
    import dit_attn.kernels.flex as flex
    import dit_attn.kernels.window as window

    big = tile_geometry((256, 256), 8.0, (8, 8))
    # closed form: circle (tile cells × halo cells) + the in-grid masks of 32 tile rows and 32 tile cols, 1 byte each
    halo = 8 + 2 * 7
    assert big.nbytes() == 8 * 8 * halo * halo + 2 * 32 * halo < (256 * 256) ** 2 // 10_000  # vs the dense S² mask
    built = {"tile": [], "blocks": []}

    def counting(cls, key, grid_of):
        def build(*args, **kwargs):
            made = cls(*args, **kwargs)
            built[key].append(grid_of(made))
            return made
        return build

    monkeypatch.setattr(window, "TileGeometry", counting(window.TileGeometry, "tile", lambda g: g.grid))
    monkeypatch.setattr(blocks, "WindowBlocks", counting(blocks.WindowBlocks, "blocks", lambda b: b.seq_q))
    for cached in (tile_geometry, blocks.window_blocks, flex.local_block_mask):
        cached.cache_clear()
    q, k, v = random_qkv(1, 2, 16 * 9 + 3, 8)
    resolutions = [(12, 12), (9, 16), (12, 12), (16, 9), (9, 16)]
    geometries = []
    for rows, cols in resolutions:
        n = rows * cols
        plan = AttentionPlan((), (3, 3 + n), LocalWindow(3, (rows, cols)))
        qs, ks, vs = (x[:, :, : n + 3] for x in (q, k, v))
        expected = attention(qs, ks, vs, plan, backend="reference")
        for backend in ("tiled", "flex"):
            assert (attention(qs, ks, vs, plan, backend=backend) - expected).abs().max() < 1e-5
        geometries.append(tile_geometry((rows, cols), 3.0, default_tile(3)))
    distinct = list(dict.fromkeys(resolutions))  # [(12, 12), (9, 16), (16, 9)]: first-seen order
    assert built["tile"] == distinct  # one build per new resolution, in order, none for a repeated one
    assert built["blocks"] == [rows * cols + 3 for rows, cols in distinct]
    assert geometries[0] is geometries[2] and geometries[1] is geometries[4]
    assert [g.grid for g in geometries] == resolutions  # never another resolution's entry
    for cached in (tile_geometry, blocks.window_blocks, flex.local_block_mask):
        cached.cache_clear()  # drop the entries built while the constructors were spied on


def test_grid_must_match_the_image_tokens():
    q, k, v = random_qkv(1, 1, 20, 4)
    with pytest.raises(ValueError, match="does not match"):
        attention(q, k, v, AttentionPlan((), (0, 18), LocalWindow(2, (4, 4))), backend="tiled")


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "8", True, None])
def test_bad_radius(bad):
    with pytest.raises(ValueError, match="radius"):
        da.LocalAttention(bad)


def test_bad_settings():
    with pytest.raises(ValueError, match="text"):
        da.LocalAttention(4, text="local")
    with pytest.raises(ValueError, match="downsample"):
        da.LocalAttention(4, downsample=1)
    with pytest.raises(ValueError, match="backend"):
        da.LocalAttention(4, backend="cuda")
    with pytest.raises(ValueError, match="not found"):
        da.LocalAttention(4, weights="/nonexistent/clear.safetensors")
    with pytest.raises(ValueError, match="layers"):
        da.LocalAttention(4, layers=())
    with pytest.raises(ValueError, match="down-sampling by 4"):
        LocalWindow(4, (6, 8), 4, torch.ones(4, 4))


# --- in pipelines -------------------------------------------------------------------------------

def run(call, pipe, *edits, **kwargs):
    if not edits:
        return call(pipe, **kwargs)
    with da.apply(pipe, *edits):
        return call(pipe, **kwargs)


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_pipelines_local_equals_reference_and_full_radius_equals_stock(family, sd3_pipe, sd35_pipe, flux_pipe):
    pipe, call = {"sd3": (sd3_pipe, sd3_call), "sd35": (sd35_pipe, sd3_call), "flux": (flux_pipe, flux_call)}[family]
    stock = run(call, pipe)
    full = run(call, pipe, da.LocalAttention(100))
    assert (full - stock).abs().max() < 1e-5
    tiled = run(call, pipe, da.LocalAttention(1.5, backend="tiled"))
    reference = run(call, pipe, da.LocalAttention(1.5, backend="reference"))
    assert (tiled - reference).abs().max() < 1e-4
    assert (run(call, pipe, da.LocalAttention(1.5, backend="flex")) - reference).abs().max() < 1e-4
    assert (tiled - stock).abs().max() > 1e-3  # the window changes the result
    # another resolution in the next call: a new grid, no stale mask
    size = dict(height=48, width=32)
    assert (run(call, pipe, da.LocalAttention(2, backend="tiled"), **size)
            - run(call, pipe, da.LocalAttention(2, backend="reference"), **size)).abs().max() < 1e-4


def test_composes_with_head_guidance_and_softpag(sd3_pipe):
    edits = (da.HeadGuidance(heads=["L1H0", "L2"], scale=2.0, u=0.7), da.SoftPAG(heads=["L0H1"], u=0.5, scope="image"))
    tiled = run(sd3_call, sd3_pipe, da.LocalAttention(2, backend="tiled"), *edits)
    reference = run(sd3_call, sd3_pipe, da.LocalAttention(2, backend="reference"), *edits)
    assert (tiled - reference).abs().max() < 1e-4
    assert (tiled - run(sd3_call, sd3_pipe, *edits)).abs().max() > 1e-3


def test_downsample_registers_spatial_weights_and_removes_them(sd3_pipe):
    transformer = sd3_pipe.transformer
    before = {name for name, _ in transformer.named_parameters()}
    with da.apply(sd3_pipe, da.LocalAttention(2, downsample=4, layers=(0, 2))):
        added = {name for name, _ in transformer.named_parameters()} - before
        assert added == {"transformer_blocks.0.attn.local_pool.spatial_weight", "transformer_blocks.2.attn.local_pool.spatial_weight"}
        tiled = sd3_call(sd3_pipe)
    assert {name for name, _ in transformer.named_parameters()} == before
    with da.apply(sd3_pipe, da.LocalAttention(2, downsample=4, layers=(0, 2), backend="reference")):
        assert (sd3_call(sd3_pipe) - tiled).abs().max() < 1e-4


def test_weights_file_loads_and_is_undone(sd3_pipe, tmp_path):
    transformer = sd3_pipe.transformer
    name = "transformer_blocks.1.attn.to_q.weight"
    original = transformer.get_parameter(name).detach().clone()
    path = tmp_path / "clear.safetensors"
    save_file({name: original + 1.0, "transformer_blocks.1.attn.local_pool.spatial_weight": torch.full((4, 4), 0.5)}, path)
    with da.apply(sd3_pipe, da.LocalAttention(2, downsample=4, weights=path)):
        assert torch.equal(transformer.get_parameter(name), original + 1.0)
        assert torch.equal(transformer.get_parameter("transformer_blocks.1.attn.local_pool.spatial_weight"), torch.full((4, 4), 0.5))
        saved = transformer.state_dict()  # what save_pretrained writes: the stock checkpoint
        assert torch.equal(saved[name], original) and not any("local_pool" in key for key in saved)
    assert torch.equal(transformer.get_parameter(name), original)
    with pytest.raises(ValueError, match="same downsample"):  # pooled weights without downsample
        da.apply(sd3_pipe, da.LocalAttention(2, weights=path))
    assert torch.equal(transformer.get_parameter(name), original)
    save_file({name: torch.zeros(3, 3)}, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match="shape"):
        da.apply(sd3_pipe, da.LocalAttention(2, weights=tmp_path / "shape.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        da.apply(sd3_pipe, da.LocalAttention(2, weights=tmp_path / "junk.safetensors"))
    with pytest.raises(ValueError, match="do not exist"):
        da.apply(sd3_pipe, da.LocalAttention(2, layers=(7,)))
    assert not hasattr(transformer.transformer_blocks[1].attn, "local_pool")


def test_flux_ids_off_the_grid_give_a_clear_error(flux_pipe):
    transformer = flux_pipe.transformer
    hidden = torch.randn(1, 16, transformer.config.in_channels)
    ids = torch.zeros(16, 3)
    ids[:, 1] = torch.arange(16) % 4
    ids[:, 2] = torch.arange(16) // 4  # column-major
    with da.apply(flux_pipe, da.LocalAttention(2)), pytest.raises(ValueError, match="row-major"):
        transformer(hidden_states=hidden, encoder_hidden_states=torch.randn(1, 3, transformer.config.joint_attention_dim),
                    pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim),
                    timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(3, 3),
                    guidance=torch.tensor([3.5]) if transformer.config.guidance_embeds else None)


def test_length_adjusted_scale(sd3_pipe):
    """train_tokens = this call's image tokens leaves the scale at 1/sqrt(D); other values change it."""
    tokens = (32 // sd3_pipe.vae_scale_factor // sd3_pipe.transformer.config.patch_size) ** 2  # 32x32 pixels
    base = run(sd3_call, sd3_pipe, da.LocalAttention(2))
    same = run(sd3_call, sd3_pipe, da.LocalAttention(2, train_tokens=tokens))
    assert (same - base).abs().max() < 1e-6
    assert (run(sd3_call, sd3_pipe, da.LocalAttention(2, train_tokens=4)) - base).abs().max() > 1e-4
    with pytest.raises(ValueError, match="train_tokens"):
        da.LocalAttention(2, train_tokens=1)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_highres_workflow(family, sd3_pipe, flux_pipe):
    from dit_attn.workflows.highres import generate_highres

    pipe = sd3_pipe if family == "sd3" else flux_pipe
    theta = getattr(pipe.transformer.pos_embed, "theta", None)
    result = generate_highres(pipe, "a red circle", 64, 48, radius=2, base_height=32, base_width=32,
                              num_inference_steps=3, max_sequence_length=8)
    assert result.image.size == (48, 64) and result.base_image.size == (32, 32)
    assert getattr(pipe.transformer.pos_embed, "theta", None) == theta  # NTK scaling undone
    assert type(pipe.transformer.transformer_blocks[0].attn.processor).__module__.startswith("diffusers")
    with pytest.raises(ValueError, match="at least the base size"):
        generate_highres(pipe, "x", 16, 16, radius=2, base_height=32, base_width=32)
