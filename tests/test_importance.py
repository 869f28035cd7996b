"""Claim §6.3: before any training, importance-ordered prefixes beat a random order (trained tiny model)."""

from __future__ import annotations

from flexcli.commands.convert import ConvertOptions, convert
from flexcli.commands.pretrain import PretrainOptions, pretrain


def test_importance_order_beats_random_order_at_half_width(tmp_path):
    base = pretrain(
        tmp_path / "base",
        PretrainOptions(size="tiny", steps=150, batch_size=8, seq_len=128, precision="fp32"),
    )
    assert base.heldout_ppl < 200  # it learned something (vocab 512: uniform guessing is 512)
    recipe = tmp_path / "random.yaml"
    recipe.write_text("importance:\n  order: random\n  seed: 1\n")
    common = dict(calib="stdlib", calib_samples=16, seq_len=128, eval_data="stdlib", device="cpu")
    imp = convert(base.output, ConvertOptions(**common, output=tmp_path / "imp"))
    rnd = convert(base.output, ConvertOptions(recipe=recipe, **common, output=tmp_path / "rnd"))
    half = {w.ratio: w.ppl for w in imp.widths}[0.5]
    half_rnd = {w.ratio: w.ppl for w in rnd.widths}[0.5]
    full = {w.ratio: w.ppl for w in imp.widths}[1.0]
    assert abs(full - {w.ratio: w.ppl for w in rnd.widths}[1.0]) < 1e-3 * full  # same function at full width
    assert half < half_rnd, (half, half_rnd)
