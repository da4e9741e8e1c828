"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: train a tiny gray learner of `task` (`classify`:
`gray_learner`, `segment`: `gray_unet_learner`) with fastai's `distrib_ctx` on CPU (gloo), then save each rank's weights
and what `learn.load` gives back.

    torchrun --nproc_per_node 2 tests/ddp_train.py OUT_DIR classify|segment
"""
import os
import sys
from pathlib import Path
import numpy as np
import torch
from fastai.vision.all import DataBlock, CategoryBlock, RandomSplitter, resnet18, set_seed
from fastai.distributed import rank_distrib, distrib_barrier
from fastai_gray.all import gray_learner, gray_unet_learner, GrayImageBlock, GrayMaskBlock

out, task = Path(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(40)]
if task == 'classify':
    target, get_y = CategoryBlock, lambda i: str(i % 2)
    def make(): return gray_learner(dls, resnet18, pretrained=False, path=out)
elif task == 'segment':
    masks = [(im > 128).astype(np.uint8) for im in images]  # labels 0 and 1
    target, get_y = GrayMaskBlock(['dark', 'bright']), lambda i: masks[i]
    def make(): return gray_unet_learner(dls, resnet18, pretrained=False, cut=-4, path=out)  # ResNet-18 up to layer2
else: raise SystemExit(f'unknown task {task!r}: classify or segment')
dls = DataBlock(blocks=(GrayImageBlock, target), get_x=lambda i: images[i], get_y=get_y,
                splitter=RandomSplitter(0.2, seed=0)).dataloaders(list(range(40)), bs=4, num_workers=0, device='cpu')
set_seed(0)
learn = make()
with learn.no_bar(), learn.distrib_ctx(sync_bn=False, cpu=True):
    learn.fit(1, 1e-2)
rank = rank_distrib()
torch.save(learn.model.state_dict(), out/f'trained{rank}.pth')
learn.save('final')          # fastai saves on rank 0 only
distrib_barrier()
fresh = make().load('final', with_opt=False)
torch.save(fresh.model.state_dict(), out/f'loaded{rank}.pth')
print(f'{task}: rank {rank} of {os.environ["WORLD_SIZE"]} done')
