"""Stage 2: SAEs on the reward model — attach, load, train, evaluate."""

from pm_lens.saes.attach import attach_saes as attach_saes
from pm_lens.saes.attach import attached_saes as attached_saes
from pm_lens.saes.attach import detach_saes as detach_saes
from pm_lens.saes.attach import feature_acts as feature_acts
from pm_lens.saes.attach import place_saes as place_saes
from pm_lens.saes.attach import saes_attached as saes_attached
from pm_lens.saes.evaluate import SAEEvaluation as SAEEvaluation
from pm_lens.saes.evaluate import evaluate_sae as evaluate_sae
from pm_lens.saes.load import load_sae as load_sae
from pm_lens.saes.node import Node as Node
from pm_lens.saes.train import TrainedSAEs as TrainedSAEs
from pm_lens.saes.train import collect_activations as collect_activations
from pm_lens.saes.train import train_saes as train_saes
