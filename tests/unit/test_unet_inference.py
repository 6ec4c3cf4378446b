"""The segmenter's inference graph (``unet.for_inference``)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from services.segmenter import unet


def test_threads_can_make_inference_graphs_at_once():
    # gRPC threads loading a segmenter together: torch.jit.trace's own check failed
    # ("Graphs differed across invocations") when two traced at the same time.
    torch.manual_seed(0)
    model = unet.UNet()
    with ThreadPoolExecutor(4) as pool:
        graphs = list(pool.map(lambda _: unet.for_inference(model), range(8)))
    rgb = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    first = unet.predict_probabilities(graphs[0], rgb)
    for graph in graphs[1:]:
        np.testing.assert_allclose(unet.predict_probabilities(graph, rgb), first, atol=1e-5)
