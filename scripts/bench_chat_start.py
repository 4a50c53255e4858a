"""How long a one-shot `chat_cli -p` takes to print its first reply token, against the floor of importing torch.

    python -m scripts.bench_chat_start                   # latest SFT checkpoint, 3 fresh processes each
    python -m scripts.bench_chat_start -i mid --runs 5 --device-type cpu

Each run is a fresh `python -m scripts.chat_cli -p hi --max-tokens 1` process (cold start, as a user runs it);
the figure is the time from launch to the first byte of the reply, split into what importing torch alone costs
and the rest (tokenizer, checkpoint read, model build, first forward). Prints the median of each and their ratio.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

from nanochat.common import add_flag, device_type_flag

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_token_seconds(argv: list[str]) -> float:
    """Seconds from launching chat_cli to the first byte of its reply (the line after its '>>> prompt' echo)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", *argv], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # cwd: this checkout's code
    proc.stdout.readline()  # ">>> hi"
    got = proc.stdout.read(1)
    elapsed = time.perf_counter() - started
    _, err = proc.communicate()
    if proc.returncode != 0 or not got:
        raise RuntimeError(f"chat_cli failed (exit {proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return elapsed


def torch_import_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - started


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_chat_start", description=__doc__.splitlines()[0])
    add_flag(p, "--source", "-i", default="sft", choices=("base", "mid", "sft"), help="which training phase")
    add_flag(p, "--runs", type=int, default=3, help="fresh processes per measurement")
    add_flag(p, "--device-type", type=device_type_flag, default="", help="cuda | cpu | mps (default: autodetect)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    chat_argv = ["-i", args.source, "-p", "hi", "--max-tokens", "1", "--device-type", args.device_type]
    firsts, floors = [], []
    for _ in range(args.runs):  # interleaved, so a change in machine load hits both figures alike
        firsts.append(first_token_seconds(chat_argv))
        floors.append(torch_import_seconds())
    first, floor = statistics.median(firsts), statistics.median(floors)
    result = {"first_token_s": first, "import_torch_s": floor, "rest_s": first - floor, "ratio": first / floor}
    print(f"chat_cli -p time to first token: {first:.2f} s (median of {args.runs})")
    print(f"import torch alone:              {floor:.2f} s")
    print(f"the rest:                        {first - floor:.2f} s; first token / import torch = {first / floor:.2f}x")
    return result


if __name__ == "__main__":
    main()
