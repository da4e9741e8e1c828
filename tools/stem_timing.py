"""The exact stem's two forms timed against each other on this machine: `conv(x) + offset(ones)` (two-term) and one
4-channel conv of `[x, 1, 0, 0]` (fused). Forward and backward, interleaved runs, medians and the ratio fused/two-term
(< 1: fused is faster). What `FUSED_ON` in fastai_gray/stem.py is set from for the CPU (issue 18).

    python tools/stem_timing.py                     # batch 16, 224 px, 1 thread: resnet18 and Lite0, stems and whole models
    python tools/stem_timing.py --device cuda --bs 256 --threads 16
"""
import argparse, copy, statistics, time
import torch, timm
from fastai_gray.stem import update_first_layer, find_first_conv

def timed(model, x, device):
    "Seconds for one forward and backward of `model` on `x`"
    if device.type == 'cuda': torch.cuda.synchronize()
    t = time.perf_counter()
    model(x).float().sum().backward()
    if device.type == 'cuda': torch.cuda.synchronize()
    return time.perf_counter() - t

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--bs', type=int, default=16); p.add_argument('--size', type=int, default=224)
    p.add_argument('--reps', type=int, default=7); p.add_argument('--threads', type=int, default=1)
    p.add_argument('--device', default='cpu')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f'{device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {a.bs}, {a.size} px, '
          f'{a.reps} interleaved runs, forward+backward, median seconds')
    for arch in ('resnet18', 'tf_efficientnet_lite0'):
        torch.manual_seed(0)
        whole = update_first_layer(timm.create_model(arch, pretrained=False)).to(device).train()
        stem = find_first_conv(whole)[1]
        x = torch.randn(a.bs, 1, a.size, a.size, device=device)  # as a batch: no gradient wanted for it
        for what, m in (('stem', stem), ('whole model', whole)):
            forms = {}
            for fused in (False, True):
                forms[fused] = copy.deepcopy(m)
                find_first_conv(forms[fused])[1].fused = fused
            times = {False: [], True: []}
            for fused in (False, True): timed(forms[fused], x, device)  # warm-up
            for _ in range(a.reps):
                for fused in (False, True): times[fused].append(timed(forms[fused], x, device))
            two, one = statistics.median(times[False]), statistics.median(times[True])
            print(f'{arch:22s} {what:11s}  two-term {two:.4f}  fused {one:.4f}  fused/two-term {one / two:.2f}')

if __name__ == '__main__': main()
