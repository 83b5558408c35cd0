"""The anomaly zoo: unsupervised models fitted on normal images only (and a few supervised ones that also
train on the training folds' labelled defects), each scoring held-out folds and the test set like the
classifier does (`python -m competition zoo --model NAME --fold K`).

Layout, by role:
- `api.py`: `AnomalyModel` (the sklearn-like face: `fit(normal_images)`, `score_samples`,
  `anomaly_maps`, `save` / `load`), `ImageSet` (lazy images), `ValidationSet`, `ZooSettings`.
- `registry.py`: the named, ready-to-run configurations (`zoo --list`), found by importing every
  module of `models/`.
- `trained.py`: `TrainedAnomalyModel`, the base of models that train a network.
- `components/`: parts written once and shared: the timm feature extractor with its disk cache
  (`features`), coreset, flow blocks, PCA, nearest neighbours, map filters, `ImageNormalise`,
  frozen submodules.
- `models/`: one file per model (PatchCore, PaDiM, DFM, DFKDE, autoencoder, STFPM, Reverse
  Distillation, EfficientAD, FastFlow, CFlow, U-Flow, DRAEM).
- `runner.py`, `evaluation.py`, `validation.py`: the zoo stage (per-fold fit, scores, metrics).

How to add a model (no shared file is edited):

1. Create `competition/zoo/models/<name>.py`. Write the method as a pure `nn.Module` named
   `<Name>Model` (features or images in, scores and maps out), with ALL fitted state in its
   buffers and parameters: `state_dict()` is the checkpoint. A buffer whose shape is known only
   after fitting (a memory bank, PCA components) is registered empty (`torch.empty(0, 0)`) and
   assigned in fit; loading gives it the saved shape.
2. Declare the hyperparameters as a typed `@dataclass` `<Name>Params` (extend `api.BackboneParams`
   when the model runs a timm backbone: it adds `backbone` and `backbone_weights`, where
   "ssl" means the experiment's own `make pretrain` output, `trained.TrainParams` when it trains a
   network). Types and `Literal` choices are checked when a config sets them; `__post_init__` can
   check ranges.
3. Write the wrapper `<Name>(AnomalyModel)` (or `TrainedAnomalyModel`, see `trained.py`): set
   `family` (the registry prefix) and `params_class`; implement `build_model()` (the module, fitted
   buffers empty), `_fit(images, validation)` (sets `self.model` to the fitted module) and
   `_predict(images, with_maps)`. Hyperparameters are `self.params.<name>`. Backbone features come
   from `components.features.shared_extractor` (one cached extractor for the whole zoo); images come
   as an `ImageSet`, resized and normalised by `images.loader(self.settings)`. Reuse the pieces of
   `components/` before writing a new one.
4. At module level, register ready-to-run configurations:
   `register("<family>-resnet18", <Name>, "one-line description", **hyperparameters)`. The name
   starts with the family; `python -m competition zoo --list` shows it, `--model NAME` runs it, and
   a config overrides any hyperparameter with `zoo.params: {NAME: {key: value}}`.
5. Models that train a network set `uses_validation = True` (TrainedAnomalyModel does): the runner
   holds out a slice of the training normals and passes a `ValidationSet` (held-out normals, the
   same images with painted defects, the real defects of the training folds) to `fit`.
   Checkpoints written during training go to `settings.run_dir` (best.pt / last.pt, with resume).
   A supervised model sets `uses_defects` (a ClassVar, or a property of its params): fit then also
   gets a `DefectSet` of the training folds' real defects with their masks (a share kept back for
   the validation set instead), and `_fit(images, validation, defects)` takes it (see `trained.py`).
6. Test it in `tests/test_zoo_<name>.py`: a short fit on generated textures that separates painted
   defects, and a save / `registry.load_model` round trip giving the same scores.
"""
