"""traces/: bad input gives a one-line TraceError naming file, row and column; CLI exit 2."""
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from traces import TraceError, TraceWarning, load_trace
from traces.cli import main

ROOT = Path(__file__).resolve().parents[1]
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
OK1 = "2023-11-16 18:15:46.6805900,374,44\n"
OK2 = "2023-11-16 18:15:50.9951690,396,109\n"

CASES = {
    # name: (file text, regex the message must match)
    "missing_column": ("TIMESTAMP,GeneratedTokens\n" "2023-11-16 18:15:46.6805900,44\n",
                       r"header \(line 1\): missing column 'ContextTokens' \(header has: TIMESTAMP, GeneratedTokens\)"),
    "non_numeric": (HEADER + OK1 + "2023-11-16 18:15:50.9951690,396,lots\n",
                    r"row 2 \(line 3\), column 'GeneratedTokens': token count 'lots' is not a number"),
    "negative": (HEADER + OK1 + OK2 + "2023-11-16 18:15:51.2224670,-5,55\n",
                 r"row 3 \(line 4\), column 'ContextTokens': token count -5 is negative"),
    "empty_cell": (HEADER + "2023-11-16 18:15:46.6805900,,44\n" + OK2,
                   r"row 1 \(line 2\), column 'ContextTokens': token count is empty"),
    "fractional": (HEADER + OK1 + "2023-11-16 18:15:50.9951690,396.5,109\n",
                   r"row 2 \(line 3\), column 'ContextTokens': token count '396.5' is not a whole number"),
    "bad_timestamp": (HEADER + OK1 + "yesterday,396,109\n",
                      r"row 2 \(line 3\), column 'TIMESTAMP': cannot parse timestamp 'yesterday'"),
    "bad_seconds": ("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,1,2\nsoon,3,4\n",
                    r"row 2 \(line 3\), column 'arrived_at': arrival time 'soon' is not a number of seconds"),
    "empty_file": ("", r"empty file \(no header and no rows\)"),
    "header_only": (HEADER, r"no requests \(header only\)"),
}


def write(tmp_path, name, text):
    p = tmp_path / f"{name}.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_trace_error_naming_file(tmp_path, case):
    text, pattern = CASES[case]
    p = write(tmp_path, case, text)
    with pytest.raises(TraceError, match=pattern) as info:
        load_trace(p)
    msg = str(info.value)
    assert msg.startswith(str(p) + ":") and "\n" not in msg


def test_trace_error_is_a_value_error():
    assert issubclass(TraceError, ValueError)


def test_corrupt_gzip_and_missing_file(tmp_path):
    p = tmp_path / "broken.csv.gz"
    p.write_bytes(gzip.compress((HEADER + OK1 * 50).encode())[:60])
    with pytest.raises(TraceError, match=r"broken\.csv\.gz: cannot parse as CSV \("):
        load_trace(p)
    with pytest.raises(TraceError, match=r"nowhere\.csv: no such trace file, and not a shipped trace name"):
        load_trace(tmp_path / "nowhere.csv")
    with pytest.raises(TraceError, match="is a directory"):
        load_trace(tmp_path)


def test_out_of_order_timestamps_are_sorted_with_a_warning(tmp_path):
    p = write(tmp_path, "shuffled", HEADER + OK2 + OK1 + "2023-11-16 18:15:51.2224670,879,55\n")
    with pytest.warns(TraceWarning, match=r"shuffled\.csv: 1 arrival\(s\) out of order \(first at row 2 \(line 3\)"):
        tr = load_trace(p)
    np.testing.assert_allclose(tr.arrival_s, [0.0, 4.314579, 4.541877], atol=1e-9)
    assert tr.prompt_tokens.tolist() == [374, 396, 879]       # tokens follow their rows
    assert tr.output_tokens.tolist() == [44, 109, 55]


@pytest.mark.parametrize("case", ["missing_column", "non_numeric", "negative", "bad_timestamp", "empty_file"])
def test_cli_info_exits_2_with_one_line(tmp_path, capsys, case):
    text, pattern = CASES[case]
    p = write(tmp_path, case, text)
    assert main(["info", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}:") and err.count("\n") == 1


def test_cli_process_exit_code(tmp_path):
    p = write(tmp_path, "neg", CASES["negative"][0])
    r = subprocess.run([sys.executable, "-m", "traces", "info", str(p)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "column 'ContextTokens': token count -5 is negative" in r.stderr
    assert r.stdout == ""
