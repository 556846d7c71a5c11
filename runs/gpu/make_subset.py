"""Copy the laptop protocol's Tiny-ImageNet files (the first 100 sorted wnids, the first 100 training images of each
in file-name order, their 50 validation images each) into gpu_data/tiny-imagenet-200, 30 MB that travel with the
device call (runs/gpu/device_check.sh; carry ["gpu_data"]). common.data loads the same tensors from it as from the
full folder (checked 2026-12-04: train 10000 and test 5000 images, torch.equal). The other 100 class folders stay
empty: the loader lists every wnid's folder before --classes keeps the first 100.
Usage: python runs/gpu/make_subset.py [data/tiny-imagenet-200] [gpu_data/tiny-imagenet-200]"""
import os, shutil, sys
src = sys.argv[1] if len(sys.argv) > 1 else "data/tiny-imagenet-200"
dst = sys.argv[2] if len(sys.argv) > 2 else "gpu_data/tiny-imagenet-200"
wnids = sorted(open(os.path.join(src, "wnids.txt")).read().split())
keep = set(wnids[:100])
os.makedirs(os.path.join(dst, "val", "images"), exist_ok=True)
shutil.copy(os.path.join(src, "wnids.txt"), dst)
shutil.copy(os.path.join(src, "val", "val_annotations.txt"), os.path.join(dst, "val"))
for w in wnids:
    folder = os.path.join(dst, "train", w, "images")
    os.makedirs(folder, exist_ok=True)
    if w in keep:
        for name in sorted(os.listdir(os.path.join(src, "train", w, "images")))[:100]:
            shutil.copy(os.path.join(src, "train", w, "images", name), folder)
for line in open(os.path.join(src, "val", "val_annotations.txt")):
    parts = line.split("\t")
    if len(parts) >= 2 and parts[1] in keep:
        shutil.copy(os.path.join(src, "val", "images", parts[0]), os.path.join(dst, "val", "images"))
