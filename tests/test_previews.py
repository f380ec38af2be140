"""Pictures of a model (previews.py): preview grids, the real grid and guidance strips."""

import numpy as np
import torch


def test_real_grid_takes_each_class_first_images_and_pads_short_classes():
    from cfgdiff.data import Dataset
    from cfgdiff.pictures.images import labelled_grid
    from cfgdiff.sampling.previews import real_grid

    images = torch.arange(5, dtype=torch.uint8).mul(40).reshape(5, 1, 1, 1).expand(5, 1, 8, 8)
    labels = torch.tensor([1, 0, 1, 1, 0])
    data = Dataset("x", images.contiguous(), labels, ("a", "b", "c"))
    white = torch.full((1, 8, 8), 255, dtype=torch.uint8)
    # a: images 1, 4 and a blank; b: images 0, 2, 3; c: none
    want = torch.stack([images[1], images[4], white, images[0], images[2], images[3], *[white] * 3])
    got = np.asarray(real_grid(data, 3))
    assert np.array_equal(got, np.asarray(labelled_grid(want, 3, ["a", "b", "c"])))
