"""Data: the prepared on-disk dataset and the packed loader in front of the C++ packer."""
from rega_engine.data.dataset import TokenDataset, TokenDatasetWriter
from rega_engine.data.loader import PackedLoader, plan_bins
from rega_engine.data.mixture import Mixture, Sample, build_mixture
from rega_engine.data.records import DataError, Record, RowStats, read_instructions, read_samples
from rega_engine.data.render import ChatRenderer, RenderError, render, render_prompt, with_system
from rega_engine.data.roles import RoleTable
