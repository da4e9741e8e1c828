"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: train a tiny gray learner with fastai's
`distrib_ctx` on CPU (gloo), then save each rank's weights and what `learn.load` gives back."""
import os
import sys
from pathlib import Path
import numpy as np
import torch
from fastai.vision.all import DataBlock, CategoryBlock, RandomSplitter, resnet18, set_seed
from fastai.distributed import rank_distrib, distrib_barrier
from fastai_gray.all import gray_learner, GrayImageBlock

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(40)]
dls = DataBlock(blocks=(GrayImageBlock, CategoryBlock), get_x=lambda i: images[i], get_y=lambda i: str(i % 2),
                splitter=RandomSplitter(0.2, seed=0)).dataloaders(list(range(40)), bs=4, num_workers=0, device='cpu')
set_seed(0)
learn = gray_learner(dls, resnet18, pretrained=False, path=out)
with learn.no_bar(), learn.distrib_ctx(sync_bn=False, cpu=True):
    learn.fit(1, 1e-2)
rank = rank_distrib()
torch.save(learn.model.state_dict(), out/f'trained{rank}.pth')
learn.save('final')          # fastai saves on rank 0 only
distrib_barrier()
fresh = gray_learner(dls, resnet18, pretrained=False, path=out).load('final', with_opt=False)
torch.save(fresh.model.state_dict(), out/f'loaded{rank}.pth')
print(f'rank {rank} of {os.environ["WORLD_SIZE"]} done')
