"""The HF experts benchmark runs tiny on the CPU and prints a markdown table."""
import pytest

pytest.importorskip("transformers")

from moe_offload.bench.hf_experts import format_table, main  # noqa: E402


def test_tiny_cpu_run_prints_a_table(capsys):
    table = main(["--tiny", "--variants", "grouped_mm,moe_offload+ckpt+offload"])
    assert "| grouped_mm |" in table and "| moe_offload+ckpt+offload |" in table
    assert table in capsys.readouterr().out


def test_format_table_ratios():
    rows = [{"variant": "a", "seconds": 0.2, "act_bytes": 4 << 20},
            {"variant": "b", "seconds": 0.1, "act_bytes": 1 << 20}]
    assert "| b | 100.0 | 0.50 | 1 | 0.25 |" in format_table(rows, "t")


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        main(["--tiny", "--variants", "grouped_mm+zip"])
