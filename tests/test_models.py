"""Every registered architecture: forward, backward, Grad-CAM layer, weights loading."""
import pytest
import torch
import torchvision
from bad_inputs import TouchMarker

from ctapp import models
from ctapp.models import ARCHITECTURES, WeightsError, create_model, get_spec

SIZE = 64  # small inputs keep VGG19 and ResNet-50 cheap on a CPU


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def built(request):
    torch.manual_seed(0)
    return request.param, create_model(request.param, 3, dropout=0.0)


def test_forward_backward_every_parameter_gets_a_gradient(built):
    name, model = built
    model.train()
    x = torch.randn(2, 3, SIZE, SIZE)
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == [], f"{name}: parameters without a gradient: {missing[:5]}"
    model.zero_grad(set_to_none=True)


def test_config_names_real_layers(built):
    name, model = built
    spec = get_spec(name)
    head = model.get_submodule(spec.head)
    assert any(isinstance(m, torch.nn.Linear) and m.out_features == 3 for m in head.modules())
    cam_layer = model.get_submodule(spec.cam_layer)
    seen = []
    handle = cam_layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, SIZE, SIZE))
    handle.remove()
    assert len(seen) == 1 and len(seen[0]) == 4, "the Grad-CAM layer must output a spatial feature map"
    assert len(spec.stages(model)) >= 4


def test_out_of_distribution_features_are_stage_outputs_from_low_to_high_level(built):
    name, model = built
    layers = get_spec(name).feature_layers(model)
    shapes = {}

    def record(layer):
        def hook(_module, _inputs, out):
            shapes[layer] = out.shape
        return hook

    handles = [model.get_submodule(layer).register_forward_hook(record(layer)) for layer in layers]
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, SIZE, SIZE))
    for handle in handles:
        handle.remove()
    sizes = [shapes[layer][-1] for layer in layers]
    assert len(layers) >= 4 and all(len(shapes[layer]) == 4 for layer in layers)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1], f"{name}: {dict(zip(layers, sizes))}"
    if name.startswith("vgg"):  # every stage ends in a max-pool, the last one included
        assert layers == [f"features.{i}" for i, layer in enumerate(model.features)
                          if isinstance(layer, torch.nn.MaxPool2d)]


def test_gradcam_map_has_input_shape(built):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    name, model = built
    model.eval()
    with GradCAM(model=model, target_layers=[model.get_submodule(get_spec(name).cam_layer)]) as cam:
        maps = cam(input_tensor=torch.randn(2, 3, SIZE, SIZE), targets=[ClassifierOutputTarget(1)] * 2)
    assert maps.shape == (2, SIZE, SIZE)
    assert maps.min() >= 0 and maps.max() <= 1


def test_vgg_head_is_compact():
    model = create_model("vgg19_bn", 4)
    head_params = sum(p.numel() for p in model.classifier.parameters())
    assert head_params == 512 * 4 + 4


def test_unknown_architecture_and_class_count():
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("alexnet", 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        create_model("baseline", 1)
    with pytest.raises(WeightsError, match="no pretrained weights"):
        create_model("baseline", 2, weights="imagenet")


def test_local_torchvision_weight_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet50()
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet50", 4, weights=path)
    assert torch.equal(model.layer4[2].conv3.weight, source.layer4[2].conv3.weight)
    assert model.fc[-1].out_features == 4  # the ImageNet head was replaced


def test_weight_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(torchvision.models.vgg19_bn().state_dict(), path)
    with pytest.raises(WeightsError, match="does not hold ResNet-50 weights"):
        create_model("resnet50", 4, weights=path)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not a loadable weight file"):
        create_model("resnet50", 4, weights=tmp_path / "junk.pth")


def test_weight_file_with_pickled_code_is_refused_even_when_the_environment_allows_pickles(tmp_path, monkeypatch):
    """torch honours TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only where a caller left weights_only unset."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "MARKER"
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save({**torchvision.models.resnet50().state_dict(), "extra": TouchMarker(marker)}, path)
    with pytest.raises(WeightsError, match="not a loadable weight file"):
        create_model("resnet50", 4, weights=path)
    assert not marker.exists(), "the pickled code ran"


def test_a_weight_file_wrapped_in_a_state_dict_key_loads_like_a_bare_one(tmp_path):
    """Training scripts often save {"state_dict": ...}; the weights inside are used."""
    source = torchvision.models.resnet50()
    torch.save({"state_dict": source.state_dict(), "epoch": 90}, tmp_path / "wrapped.pth")
    model = create_model("resnet50", 4, weights=tmp_path / "wrapped.pth")
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)


def test_imagenet_weights_use_the_torchvision_api_without_network(monkeypatch):
    """The real download path runs; only the network fetch is replaced."""
    asked = []
    expected = torchvision.models.ResNet50_Weights.IMAGENET1K_V2

    def fake_download(url, *args, **kwargs):
        asked.append(url)
        return torchvision.models.resnet50().state_dict()

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    model = create_model("resnet50", 2, weights="imagenet")
    assert asked == [expected.url]
    assert model.fc[-1].out_features == 2


def test_offline_imagenet_gives_an_actionable_message(monkeypatch):
    def offline(url, *args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match="--weights PATH"):
        models.create_model("vgg19_bn", 2, weights="imagenet")
