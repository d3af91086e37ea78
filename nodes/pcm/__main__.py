"""``python -m nodes.pcm``: the cost model's calibration point and its 4-phase prediction."""

from nodes.pcm.cost import main

main()
