"""Files per second and peak RSS of `fastai-gray predict MODEL DIR` on many tiny images (issue 17 item 6).

    python tools/predict_throughput.py 3000 30000 [--dir /tmp/predict_throughput]

Writes N 16-px gray PNGs per count (once), trains a tiny Lite0 classifier at 16 px (once), then runs `fastai-gray predict
MODEL DIR > /dev/null` in a fresh process per count, with one torch thread, and prints the files/s of the whole command
(start-up included, then without the start-up of a 1-file run) and its peak resident memory (the child's ru_maxrss)."""
import argparse, os, subprocess, sys, time
from pathlib import Path
import numpy as np
from PIL import Image

def images(folder:Path, n:int) -> Path:
    if (folder/'done').exists(): return folder
    rng = np.random.default_rng(0)
    for c in ('dark', 'bright'): (folder/c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = ('dark', 'bright')[i % 2]
        Image.fromarray(rng.integers(0, 60, (16, 16), dtype=np.uint8) + (150 if c == 'bright' else 0)).save(folder/c/f'{i:06d}.png')
    (folder/'done').touch()
    return folder

def run(argv:list, env:dict) -> tuple[float, float]:
    "`(seconds, peak RSS in MiB)` of one fresh `fastai-gray` process, stdout to /dev/null"
    t0 = time.perf_counter()
    with open(os.devnull, 'w') as null:
        p = subprocess.Popen([sys.executable, '-m', 'fastai_gray', *argv], stdout=null, env=env)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own resource use
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0, p.returncode
    return time.perf_counter() - t0, usage.ru_maxrss / 1024

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('counts', nargs='+', type=int)
    p.add_argument('--dir', default='/tmp/predict_throughput')
    p.add_argument('--bs', default='64')
    a = p.parse_args()
    root, env = Path(a.dir), {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    model = root/'tiny.safetensors'
    if not model.exists():
        subprocess.run([sys.executable, '-m', 'fastai_gray', 'train', str(images(root/'train', 64)), '--epochs', '1', '--size', '16',
                        '--bs', '16', '--out', str(model)], env=env, check=True, stdout=subprocess.DEVNULL)
    one = images(root/'one', 1)
    start, rss1 = run(['predict', str(model), str(one), '--bs', a.bs], env)
    print(f"1 file: {start:.1f} s (start-up), peak RSS {rss1:.0f} MiB", flush=True)
    for n in a.counts:
        folder = images(root/f'n{n}', n)
        s, rss = run(['predict', str(model), str(folder), '--bs', a.bs], env)
        print(f"{n} files: {s:.1f} s, {n / s:.0f} files/s ({n / max(s - start, 1e-9):.0f} files/s without start-up), "
              f"peak RSS {rss:.0f} MiB", flush=True)
