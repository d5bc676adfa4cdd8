"""The scaling-law study's published results, as fastclip ships them."""

from fastclip.scaling import PUBLISHED_RESULTS

PUBLISHED = PUBLISHED_RESULTS
