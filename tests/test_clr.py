"""CLR: the reprogrammed network equals the backbone at init, old tasks are
bit-identical after later tasks (BWT = 0) while shared-BN fine-tuning forgets, and
the per-task parameters stay under 0.6% of the backbone."""
from __future__ import annotations

import pytest
import torch

from cl.models import EfficientNetLite0, ReducedResNet18, TorchvisionResNet
from cl.models.pretrained_cnn import lite0_weights_path
from cl.stream import Batch
from strategies.clr import CLR, Reprogram, insert_reprogramming
from tests.conftest import run_inprocess


@pytest.mark.parametrize("make", [
    lambda: ReducedResNet18(input_shape=(3, 32, 32), nf=8),
    lambda: EfficientNetLite0(input_shape=(1, 32, 32)),  # the real ImageNet weights, installed offline
])
def test_at_init_the_reprogrammed_network_equals_the_backbone(make):
    torch.manual_seed(0)
    backbone = make().eval()
    channels = 1 if isinstance(backbone, EfficientNetLite0) else 3
    x = torch.randn(4, channels, 32, 32)
    before = backbone(x)
    added = insert_reprogramming(backbone)
    assert added and all(isinstance(r, Reprogram) for r in added)
    torch.testing.assert_close(backbone(x), before, rtol=0, atol=1e-6)


def test_efficientnet_lite0_weights_load_in_order_and_classify_imagenet():
    """Grace Hopper (matplotlib's sample image) is ImageNet class 652, military uniform."""
    import matplotlib
    import numpy as np
    from PIL import Image

    path = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"
    img = np.asarray(Image.open(path).convert("RGB").resize((224, 224)))
    x = (torch.tensor(img).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    backbone = EfficientNetLite0().eval()
    head = torch.nn.Linear(1280, 1000)
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    head.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    with torch.no_grad():
        assert int(head(backbone(x)).argmax()) == 652


def test_task_parameters_are_under_0_6_percent_of_resnet18():
    backbone = TorchvisionResNet("resnet18", weights=None)
    total = sum(p.numel() for p in backbone.parameters())
    kernels = sum(r.weight.numel() for r in insert_reprogramming(backbone))
    bn = sum(p.numel() for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    assert kernels == 9 * 3904 == 35_136  # 17 non-1x1 convs, 3,904 output channels in all
    assert bn == 9_600
    assert (kernels + bn) / total < 0.006
    full = TorchvisionResNet("resnet18", weights=None)
    assert sum(r.weight.numel() for r in insert_reprogramming(full, full=True)) == 35_136 + 9 * 896  # CLR-Full


class RecordingCLR(CLR):
    """Keeps task 0's logits on a fixed batch after each experience."""

    logits: list = []

    def after_experience(self, exp):
        super().after_experience(exp)
        data = self.stream[0].eval
        batch = Batch(x=data.x[:64].float() / 255, y=data.y[:64], t=data.t[:64]).to(self.device)
        self.model.eval()
        RecordingCLR.logits.append(self.predict(batch)[:, self.stream[0].classes].clone())  # task 0's head
        self.model.train()


# real digits; a random, immutable backbone stands in for the pretrained one (the
# real ImageNet weights are checked above and run in the clr_splitfmnist preset)
TIL = ["scenario=split_mnist5k", "scenario.setting=task", "scenario.max_per_class=60", "scenario.max_per_class_eval=40",
       "model=resnet18_reduced", "model.backbone.nf=8", "optimizer=adam", "optimizer.lr=0.005", "trainer.epochs=8",
       "trainer.batch_size=16", "evaluation.every=0", "logger.console=false"]


def test_old_tasks_are_bit_identical_after_later_tasks_while_shared_bn_finetuning_forgets(tmp_path):
    RecordingCLR.logits = []
    clr = run_inprocess(TIL + ["strategy=clr", "strategy._target_=tests.test_clr.RecordingCLR", "strategy.select=last"],
                        tmp_path / "clr")
    R = clr["accuracy_matrix"]
    assert clr["protocol"]["accuracy"] == "task-aware"
    for j in range(len(R)):
        assert all(R[i][j] == R[j][j] for i in range(j, len(R))), f"task {j} changed: {[r[j] for r in R]}"
    assert clr["metrics"]["bwt"] == 0
    assert all(torch.equal(RecordingCLR.logits[0], later) for later in RecordingCLR.logits[1:])
    untrained = sum(clr["initial_accuracy"]) / len(R)  # about 0.5: two classes per task
    # it learns the tasks: the mean diagonal gains 0.375-0.39 over the untrained model on AVX-512, AVX2 (1 thread)
    # and plain (no SIMD) kernels; the bar, 0.15, is 6 sd of chance on 400 samples
    assert sum(R[j][j] for j in range(len(R))) / len(R) > untrained + 0.15

    ft = run_inprocess(TIL + ["strategy=finetune"], tmp_path / "ft")
    assert ft["metrics"]["bwt"] < -0.05, ft["accuracy_matrix"]


def test_clr_refuses_a_class_incremental_stream(tmp_path):
    from cl.errors import UserError

    with pytest.raises(UserError, match="scenario.setting=task"):
        run_inprocess([t for t in TIL if "setting" not in t] + ["strategy=clr"], tmp_path / "x")


def test_missing_offline_weights_name_the_file_option(tmp_path, monkeypatch):
    from cl.errors import UserError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="checkpoint_path"):
        TorchvisionResNet("resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(UserError, match="does not exist"):
        EfficientNetLite0(checkpoint_path=str(tmp_path / "missing.pth"))
    # a file saved from torchvision's ResNet-18 loads through checkpoint_path
    ref = TorchvisionResNet("resnet18", weights=None)
    state = {k.removeprefix("net."): v for k, v in ref.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(state, tmp_path / "r18.pth")
    loaded = TorchvisionResNet("resnet18", checkpoint_path=str(tmp_path / "r18.pth")).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), ref.eval()(x))


def tiny_task_stream(T: int = 3, n: int = 8):
    from cl.stream import Experience, Stream, TensorData

    g = torch.Generator().manual_seed(0)
    exps = []
    for i in range(T):
        d = TensorData(torch.rand(n, 3, 8, 8, generator=g), torch.tensor([2 * i, 2 * i + 1] * (n // 2))).with_task(i)
        exps.append(Experience(i, [2 * i, 2 * i + 1], d, d, i))
    return Stream(exps, "task", "tiny", 2 * T, (3, 8, 8), base=2, increment=2)


def test_task_agnostic_logits_take_each_tasks_columns_from_that_tasks_own_model():
    """The official code has one model (reprogramming set + head) per task, so task u's
    columns of the task-agnostic logits are task u's stored model on the input: the
    stored head of task u on the features of task u's set, whatever is live."""
    import copy

    import torch.nn.functional as F

    from cl.models import Classifier
    from tests.helpers import train_experience

    torch.manual_seed(0)
    stream = tiny_task_stream()
    model = Classifier(lambda input_shape: ReducedResNet18(input_shape=input_shape, nf=4), (3, 8, 8))
    clr = CLR(model, lambda p: torch.optim.Adam(p, lr=0.05), select="last")
    clr.setup(stream)
    for exp in stream[:2]:
        train_experience(clr, exp, steps=3)
    clr.before_experience(stream[2])  # task 2 trains: the live set is neither stored nor pristine
    clr.configure_optimizer(stream[2])
    batch = next(stream[2].train.batches(8))
    clr.training_step(batch).backward()
    clr.optimizer.step()
    with torch.no_grad():
        head = model.head.fc
        head.weight[[0, 1]] += 1.0  # later tasks' optimizers may move old rows (e.g. weight decay)
    x = torch.cat([stream[j].eval.x[:2] for j in range(3)])
    t = torch.tensor([0, 0, 1, 1, 2, 2])
    model.eval()
    with torch.no_grad():
        before = model(x)
    logits = clr.predict(Batch(x=x, y=torch.zeros(6, dtype=torch.long), t=t))

    expected = torch.empty(6, 6)
    for u in range(3):
        own = copy.deepcopy(model)
        cols = stream[u].classes
        if u in clr.sets:  # a finished task: its stored set and head
            stored = {k: v for k, v in clr.sets[u].items() if k.startswith("backbone.")}
            own.load_state_dict({**own.state_dict(), **stored})
            w, b = clr.sets[u]["head.weight"], clr.sets[u]["head.bias"]
        else:  # the task training now: the live model
            w, b = head.weight[cols], head.bias[cols]
        with torch.no_grad():
            expected[:, cols] = F.linear(own.eval().backbone(x), w, b)
    torch.testing.assert_close(logits, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # predict left the live model as it was


def test_clr_cifar100_preset_resizes_to_224_and_normalises_only():
    """The official pipeline, for training and evaluation alike: Resize((224, 224)), ToTensor,
    Normalize(ImageNet mean/std); no random crop, no flip, no centre crop."""
    from hydra.utils import instantiate

    from cl.transforms import Compose, Normalize, Resize
    from tests.conftest import compose

    cfg = compose(["experiment=clr_cifar100"])
    raw = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    import torch.nn.functional as F

    want = (F.interpolate(raw.float() / 255, size=(224, 224), mode="bilinear", align_corners=False) - mean) / std
    for node in (cfg.scenario.train_transform, cfg.scenario.eval_transform):
        transform = instantiate(node, _convert_="all")
        assert isinstance(transform, Compose)
        assert [type(s) for s in transform.transforms] == [Resize, Normalize]
        assert tuple(transform.transforms[0].size) == (224, 224)
        out = [transform(raw, torch.Generator().manual_seed(s)) for s in (0, 1)]
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)  # nothing random
        torch.testing.assert_close(out[0], want, rtol=1e-4, atol=1e-4)
