"""Stage 1: a reward model loaded as a TransformerLens/SAELens model (see ``reward_model``)."""

from pm_lens.model.architectures import ARCHITECTURES as ARCHITECTURES
from pm_lens.model.placement import as_device as as_device
from pm_lens.model.placement import as_devices as as_devices
from pm_lens.model.placement import as_dtype as as_dtype
from pm_lens.model.reward_model import RewardModel as RewardModel
from pm_lens.model.reward_model import WeightProcessing as WeightProcessing
from pm_lens.model.runs import DeltaRun as DeltaRun
from pm_lens.model.runs import ForwardCount as ForwardCount
from pm_lens.model.runs import final_positions as final_positions
from pm_lens.model.split import LayerSplit as LayerSplit
