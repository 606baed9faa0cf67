"""3-D (video) local windows: the dense mask against a brute-force definition, the tiled backend against the
dense-mask reference (odd grids, borders, text keys, SoftPAG, gradients), the limits (one token, the whole
grid), and LocalAttention with a 3-tuple radius in the Wan toy pipeline."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import dit_attn as da
from dit_attn.families import family_of
from dit_attn.kernels import AttentionPlan, LocalWindow3D, Perturbation, attention
from dit_attn.kernels.tiled import video_image_attention
from dit_attn.kernels.window import dense_mask, video_tile_geometry
from dit_attn.toy.wan import WAN_RUN, build_wan_pipeline

torch.set_num_threads(1)


def brute_force_allowed(grid, radius, text_before, text_after, shape="ellipsoid"):
    frames, rows, cols = grid
    cells = list(itertools.product(range(frames), range(rows), range(cols)))
    n = len(cells)
    seq = text_before + n + text_after
    allowed = torch.ones(seq, seq, dtype=torch.bool)
    for i, (ti, yi, xi) in enumerate(cells):
        for j, (tj, yj, xj) in enumerate(cells):
            if shape == "box":
                inside = abs(ti - tj) < radius[0] and abs(yi - yj) < radius[1] and abs(xi - xj) < radius[2]
            else:
                inside = ((ti - tj) / radius[0]) ** 2 + ((yi - yj) / radius[1]) ** 2 + ((xi - xj) / radius[2]) ** 2 < 1
            allowed[text_before + i, text_before + j] = inside
    return allowed


@pytest.mark.parametrize("grid,radius,before,after", [
    ((3, 5, 7), (1.5, 2.2, 3.1), 0, 0),
    ((3, 5, 7), (2, 2, 2), 3, 0),
    ((2, 4, 3), (1, 2.5, 1.5), 0, 2),
])
def test_dense_mask_is_the_ellipsoid(grid, radius, before, after):
    n = grid[0] * grid[1] * grid[2]
    window = LocalWindow3D(radius, grid)
    got = dense_mask(before + n + after, slice(before, before + n), window)
    assert torch.equal(got, brute_force_allowed(grid, radius, before, after))


@pytest.mark.parametrize("grid,radius,before", [((3, 5, 7), (1.5, 2.2, 3.1), 0), ((2, 4, 6), (1, 3.5, 2.5), 3)])
def test_dense_mask_is_the_box(grid, radius, before):
    n = grid[0] * grid[1] * grid[2]
    got = dense_mask(before + n, slice(before, before + n), LocalWindow3D(radius, grid, "box"))
    assert torch.equal(got, brute_force_allowed(grid, radius, before, 0, "box"))
    assert not torch.equal(got, dense_mask(before + n, slice(before, before + n), LocalWindow3D(radius, grid)))


def qkv(seq, dtype=torch.float64, batch=2, heads=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq, dim, generator=g, dtype=dtype) for _ in range(3))


def softpag(batch=2, dtype=torch.float64):
    u = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.25]], dtype=dtype)[:batch]
    return (Perturbation(u, "identity", "image"), Perturbation(u.flip(1), "uniform", "joint"))


CASES = [  # grid, radius, text tokens, text after the video (Wan-like order) or before, tile
    ((3, 5, 7), (1.5, 2.2, 3.1), 0, True, None),
    ((3, 5, 7), (2, 3, 4), 5, True, (1, 2, 3)),
    ((4, 6, 9), (2.5, 3, 4), 3, False, (2, 4, 8)),
    ((5, 3, 11), (3, 1, 6), 0, True, (2, 2, 4)),
    ((1, 7, 5), (1, 3.5, 2), 4, False, None),
]


@pytest.mark.parametrize("grid,radius,text,text_after,tile", CASES)
@pytest.mark.parametrize("with_softpag", [False, True])
def test_tiled_equals_the_dense_mask_reference(grid, radius, text, text_after, tile, with_softpag, monkeypatch):
    if tile is not None:
        monkeypatch.setattr("dit_attn.kernels.tiled.default_tile_3d", lambda radius: tile)
    n = grid[0] * grid[1] * grid[2]
    seq = n + text
    tokens = (0, n) if text_after else (text, seq)
    q, k, v = qkv(seq)
    plan = AttentionPlan(softpag() if with_softpag else (), tokens, LocalWindow3D(radius, grid))
    want = attention(q, k, v, plan, backend="reference")
    assert (attention(q, k, v, plan, backend="tiled") - want).abs().max() < 1e-12
    got32 = attention(*(x.float() for x in (q, k, v)), plan, backend="tiled")
    assert (got32.double() - want).abs().max() < 1e-5
    stock = F.scaled_dot_product_attention(q, k, v)
    assert (want - stock).abs().max() > 1e-3  # the window matters on these grids


@pytest.mark.parametrize("grid,radius,text,text_after,tile", [CASES[1], CASES[2]])
def test_tiled_box_equals_the_dense_mask_reference(grid, radius, text, text_after, tile, monkeypatch):
    monkeypatch.setattr("dit_attn.kernels.tiled.default_tile_3d", lambda radius: tile)
    n = grid[0] * grid[1] * grid[2]
    tokens = (0, n) if text_after else (text, n + text)
    q, k, v = qkv(n + text)
    plan = AttentionPlan(softpag(), tokens, LocalWindow3D(radius, grid, "box"))
    want = attention(q, k, v, plan, backend="reference")
    assert (attention(q, k, v, plan, backend="tiled") - want).abs().max() < 1e-12
    got32 = attention(*(x.float() for x in (q, k, v)), plan, backend="tiled")
    assert (got32.double() - want).abs().max() < 1e-5
    ellipsoid = attention(q, k, v, AttentionPlan(softpag(), tokens, LocalWindow3D(radius, grid)), backend="reference")
    assert (want - ellipsoid).abs().max() > 1e-3


def test_box_tiles_see_the_whole_box_and_cover_the_grid_by_its_far_corner():
    geo = video_tile_geometry((9, 20, 30), (3.0, 8.0, 12.0), (1, 4, 8), "box")
    assert torch.all(geo.allowed.sum(dim=1) == 5 * 15 * 23)  # |dt| <= 2, |dy| <= 7, |dx| <= 11
    assert LocalWindow3D((2.01, 4.01, 6.01), (3, 5, 7), "box").covers_grid()  # the far corner is (2, 4, 6)
    assert not LocalWindow3D((2.01, 4.01, 6.0), (3, 5, 7), "box").covers_grid()
    assert not LocalWindow3D((2.01, 4.01, 6.01), (3, 5, 7)).covers_grid()  # the ellipsoid misses that corner


@pytest.mark.parametrize("grid,radius,text", [((3, 5, 7), (1.5, 2.2, 3.1), 0), ((2, 4, 6), (2, 2.5, 3), 3)])
def test_tiled_gradients_equal_the_reference(grid, radius, text):
    n = grid[0] * grid[1] * grid[2]
    plan = AttentionPlan(softpag(), (0, n), LocalWindow3D(radius, grid))
    grads = []
    for backend in ("reference", "tiled"):
        q, k, v = (x.requires_grad_() for x in qkv(n + text))
        out = attention(q, k, v, plan, backend=backend)
        out.pow(2).sum().backward()
        grads.append((out.detach(), q.grad, k.grad, v.grad))
    for want, got in zip(*grads):
        assert (want - got).abs().max() < 1e-10


def test_video_tiles_cover_their_ellipsoids_away_from_borders():
    geo = video_tile_geometry((9, 20, 30), (3.0, 8.0, 12.0), (1, 4, 8))
    keys_per_query = geo.allowed.sum(dim=1)
    offsets = torch.cartesian_prod(torch.arange(-2, 3), torch.arange(-7, 8), torch.arange(-11, 12))
    in_ellipsoid = ((offsets.double() / torch.tensor([3.0, 8.0, 12.0])) ** 2).sum(dim=1) < 1
    assert torch.all(keys_per_query == int(in_ellipsoid.sum()))


@pytest.mark.parametrize("text", [0, 4])
def test_radius_covering_one_token_sees_only_itself(text):
    grid = (3, 5, 7)
    n = 105
    q, k, v = qkv(n + text)
    plan = AttentionPlan((), (0, n), LocalWindow3D((1, 1, 1), grid))
    got = attention(q, k, v, plan, backend="tiled")
    assert (got - attention(q, k, v, plan, backend="reference")).abs().max() < 1e-12
    if text == 0:
        assert (got - v).abs().max() < 1e-12
    else:  # itself plus the text keys
        keys = torch.arange(n + text)
        mask = (keys[:n, None] == keys[None, :]) | (keys[None, :] >= n)
        want = F.scaled_dot_product_attention(q[:, :, :n], k, v, attn_mask=mask)
        assert (got[:, :, :n] - want).abs().max() < 1e-12


def test_radius_covering_the_grid_is_stock_attention():
    grid = (3, 5, 7)
    q, k, v = qkv(105 + 4, dtype=torch.float32)
    window = LocalWindow3D((3.47, 6.93, 10.4), grid)  # the far corner (2, 4, 6) is just inside
    assert window.covers_grid() and not LocalWindow3D((3.46, 6.92, 10.39), grid).covers_grid()
    plan = AttentionPlan((), (0, 105), window)
    stock = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attention(q, k, v, plan, backend="tiled"), stock)
    assert (attention(q, k, v, plan, backend="reference") - stock).abs().max() < 1e-6


def test_fused_and_exact_paths_agree():
    grid = (4, 6, 9)
    q, k, v = qkv(216 + 5, dtype=torch.float32, batch=2)
    window = LocalWindow3D((2, 3, 4), grid)
    args = (q[:, :, :216], k[:, :, :216], v[:, :, :216], k[:, :, 216:], v[:, :, 216:], window, 0.25)
    fused = video_image_attention(*args)
    with torch.enable_grad():
        exact = video_image_attention(*(x.requires_grad_() if isinstance(x, torch.Tensor) else x for x in args))
    assert (fused - exact).abs().max() < 1e-5


FLEX_CASES = [  # grid, radius, text tokens, text after the video; several 128-token blocks: full, partial, empty pairs
    ((3, 16, 24), (1.5, 3.2, 4.1), 7, True),
    ((2, 12, 20), (1, 5, 5), 20, False),
]


def block_pairs(allowed: torch.Tensor, block: int) -> torch.Tensor:
    """(S, S) bool → per (query block, key block) the number of allowed pairs."""
    seq = allowed.shape[0]
    n = -(-seq // block)
    padded = F.pad(allowed.int(), (0, n * block - seq, 0, n * block - seq))
    return padded.view(n, block, n, block).sum(dim=(1, 3))


@pytest.mark.parametrize("shape", ["ellipsoid", "box"])
@pytest.mark.parametrize("grid,radius,text,text_after", FLEX_CASES)
def test_video_blocks_are_sound_against_the_dense_mask(grid, radius, text, text_after, shape):
    from dit_attn.kernels.blocks3d import video_window_blocks

    n = grid[0] * grid[1] * grid[2]
    blocks = video_window_blocks(grid, radius, shape, text, 64)
    # the dense mask with text first, then the video tokens in the blocks' (tile) order
    mask = dense_mask(n + text, slice(text, n + text), LocalWindow3D(radius, grid, shape))
    order = torch.cat([torch.arange(text), blocks.order + text])
    counts = block_pairs(mask[order][:, order], 64)
    sizes = block_pairs(torch.ones_like(mask), 64)
    assert torch.equal(blocks.full, counts == sizes)  # full: every pair allowed (and every such pair is full)
    assert torch.all((counts > 0) <= (blocks.full | blocks.partial))  # no allowed pair in a skipped block
    assert blocks.partial.any() and (counts == 0).any()


@pytest.mark.parametrize("shape", ["ellipsoid", "box"])
@pytest.mark.parametrize("grid,radius,text,text_after", FLEX_CASES)
def test_flex_equals_the_dense_mask_reference(grid, radius, text, text_after, shape, monkeypatch):
    monkeypatch.setenv("DIT_ATTN_FLEX_COMPILE", "0")  # eager flex: the compiled kernel is tested once below
    n = grid[0] * grid[1] * grid[2]
    tokens = (0, n) if text_after else (text, n + text)
    q, k, v = qkv(n + text, dtype=torch.float32, batch=1, heads=3)
    plan = AttentionPlan(softpag(batch=1, dtype=torch.float32), tokens, LocalWindow3D(radius, grid, shape))
    want = attention(q, k, v, plan, backend="reference")
    assert (attention(q, k, v, plan, backend="flex") - want).abs().max() < 1e-5
    assert (want - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-3


def test_compiled_flex_equals_the_dense_mask_reference(monkeypatch):
    import dit_attn.kernels.flex as flex

    monkeypatch.setenv("DIT_ATTN_FLEX_COMPILE", "1")
    grid, text = (3, 10, 13), 7
    n = grid[0] * grid[1] * grid[2]
    q, k, v = qkv(n + text, dtype=torch.float32, batch=1, heads=2)
    plan = AttentionPlan((), (0, n), LocalWindow3D((1.5, 3.2, 4.1), grid, "box"))
    out = attention(q, k, v, plan, backend="flex")
    assert not flex._compile_failed, flex._compile_failed
    assert (out - attention(q, k, v, plan, backend="reference")).abs().max() < 1e-5


TRITON_CHECK = """
import torch
from dit_attn.kernels import AttentionPlan, LocalWindow3D, Perturbation, attention, choose_backend
from dit_attn.kernels.triton.sparsity import video_sparsity
torch.manual_seed(0)
u = torch.tensor([[0.0, 0.7]])
for grid, radius, shape, text, after in (((2, 8, 24), (1.5, 2.2, 4.1), "ellipsoid", 5, True),
                                         ((3, 4, 9), (2, 2.5, 3), "box", 3, False)):
    n = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, 2, n + text, 16) for _ in range(3))
    tokens = (0, n) if after else (text, n + text)
    plan = AttentionPlan((Perturbation(u, "uniform", "image"),), tokens, LocalWindow3D(radius, grid, shape))
    err = (attention(q, k, v, plan, backend="triton") - attention(q, k, v, plan, backend="reference")).abs().max()
    assert err < 1e-5, (grid, shape, err)
    assert choose_backend(q, plan).name == "tiled"  # auto takes the 3-D triton kernel only when named
    s = video_sparsity(grid, tuple(map(float, radius)), shape, text, 64, q.device)
    print(grid, shape, "full", int(s.full_count.sum()), "partial", int(s.part_count.sum()), "of", s.full_index.numel())
q.requires_grad_()
try:
    attention(q, k, v, plan, backend="triton")
    raise SystemExit("gradients ran on the 3-D triton kernel")
except ValueError as err:
    assert "no backward" in str(err), err
"""


def test_triton_equals_the_dense_mask_reference_in_the_interpreter():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]  # the first case skips some block pairs and masks others
    full, partial, total = (int(w) for w in first.split()[-5::2])
    assert 0 < partial and full + partial < total, first


def test_bad_radii_and_refusals():
    with pytest.raises(ValueError, match=r"3-tuple \(frames, height, width\)"):
        da.LocalAttention(radius=(2, 3))
    with pytest.raises(ValueError, match="radius must be a finite number > 0"):
        da.LocalAttention(radius=(2, 0, 3))
    with pytest.raises(ValueError, match="downsample.*not implemented for 3-D"):
        da.LocalAttention(radius=(2, 3, 3), downsample=2)
    with pytest.raises(ValueError, match=r"video grid .* needs radius=\(frames, height, width\)"):
        LocalWindow3D.for_call(2.0, (3, 5, 7), None)
    with pytest.raises(ValueError, match="3-D .* radius for video grids; this call's image grid is 4×4"):
        LocalWindow3D.for_call((1.0, 2.0, 2.0), (4, 4), None)
    q, k, v = qkv(105)
    plan = AttentionPlan((), None, LocalWindow3D((1, 2, 2), (3, 5, 7)))
    with pytest.raises(ValueError, match="does not match the 104 video tokens"):
        attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], plan, backend="tiled")
    with pytest.raises(ValueError, match="shape must be one of 'ellipsoid', 'box'"):
        da.LocalAttention(radius=(2, 3, 3), shape="cube")
    with pytest.raises(ValueError, match=r"shape='box' is a 3-D window: give radius=\(frames, height, width\)"):
        da.LocalAttention(radius=3, shape="box")
    with pytest.raises(ValueError, match="shape must be one of"):
        LocalWindow3D((1, 2, 2), (3, 5, 7), "sphere")
    assert da.LocalAttention.from_dict(da.LocalAttention(radius=(2, 3, 3), shape="box").to_dict()).shape == "box"
    assert da.LocalAttention(radius=(2, 3, 3)).to_dict()["radius"] == [2, 3, 3]
    assert da.LocalAttention.from_dict(da.LocalAttention(radius=(2, 3, 3)).to_dict()).radius == (2, 3, 3)


# --- the Wan toy pipeline: 9 frames of 48 × 80 pixels are a 3 × 3 × 5 token grid -----------------------

VIDEO = dict(WAN_RUN, num_frames=9, height=48, width=80)


@pytest.fixture(scope="module")
def wan_pipe():
    pipe = build_wan_pipeline(num_layers=2, num_heads=2, head_dim=12)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_latents(pipe, *edits):
    def run():
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                    output_type="latent", guidance_scale=3.0, **VIDEO).frames
    if not edits:
        return run()
    with da.apply(pipe, *edits):
        return run()


def test_wan_grid_is_frames_height_width(wan_pipe):
    latents = torch.zeros(1, 16, 3, 6, 10)
    assert family_of(wan_pipe.transformer).grid(wan_pipe.transformer, {"hidden_states": latents}) == ((3, 3, 5), "")


def test_wan_local_attention_equals_the_reference(wan_pipe):
    stock = wan_latents(wan_pipe)
    radius = (1.5, 1.5, 2.5)
    local = wan_latents(wan_pipe, da.LocalAttention(radius))
    assert (local - stock).abs().max() > 1e-3
    reference = wan_latents(wan_pipe, da.LocalAttention(radius, backend="reference"))
    assert (local - reference).abs().max() < 1e-5
    with_pag = wan_latents(wan_pipe, da.LocalAttention(radius), da.SoftPAG(heads=["L1H0"], u=0.7))
    with_pag_reference = wan_latents(wan_pipe, da.LocalAttention(radius, backend="reference"),
                                     da.SoftPAG(heads=["L1H0"], u=0.7))
    assert (with_pag - local).abs().max() > 1e-4
    assert (with_pag - with_pag_reference).abs().max() < 1e-5
    covering = wan_latents(wan_pipe, da.LocalAttention((4, 4, 8)))  # the far corner (2, 2, 4) is inside
    assert (covering - stock).abs().max() < 1e-6


def test_wan_box_window_equals_the_reference(wan_pipe):
    radius = (1.5, 1.5, 2.5)
    box = wan_latents(wan_pipe, da.LocalAttention(radius, shape="box"))
    assert (box - wan_latents(wan_pipe, da.LocalAttention(radius))).abs().max() > 1e-3
    assert (box - wan_latents(wan_pipe, da.LocalAttention(radius, shape="box", backend="reference"))).abs().max() < 1e-5


def test_wan_refuses_a_scalar_radius_clearly(wan_pipe):
    with pytest.raises(ValueError, match=r"video grid \(frames × height × width tokens\) needs radius=\(frames, height, width\)"):
        wan_latents(wan_pipe, da.LocalAttention(2.0, layers=[1]))
