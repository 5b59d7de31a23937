"""The `vae` stage's fast paths compute what diffusers' AutoencoderKLQwenImage computes."""

import copy

import torch
from diffusers import AutoencoderKLQwenImage

from editkit.train.vae_stage import single_frame_convs


def _vae(dim_mult=(1, 2, 2)):
    torch.manual_seed(0)
    down = [False] * (len(dim_mult) - 1)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=list(dim_mult), num_res_blocks=1,
                                  temperal_downsample=down)


def _step(vae, x):
    posterior = vae.encode(x).latent_dist
    rec = vae.decode(posterior.mean).sample
    loss = (rec - x).pow(2).mean() + posterior.logvar.mean()
    vae.zero_grad()
    loss.backward()
    return rec.detach(), {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}


def test_single_frame_convs_give_the_same_outputs_and_gradients():
    plain = _vae()
    fast = single_frame_convs(copy.deepcopy(plain))
    x = torch.rand(3, 3, 1, 16, 16) * 2 - 1
    rec_a, grads_a = _step(plain, x)
    rec_b, grads_b = _step(fast, x)
    torch.testing.assert_close(rec_a, rec_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)
    # the saved model is the plain diffusers one
    assert plain.state_dict().keys() == fast.state_dict().keys()


def test_single_frame_convs_leave_videos_to_diffusers():
    torch.manual_seed(0)
    plain = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True])
    fast = single_frame_convs(copy.deepcopy(plain))
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1  # 1 + 4 frames: the encoder runs chunks with a feature cache
    with torch.no_grad():
        a = plain.decode(plain.encode(x).latent_dist.mode()).sample
        b = fast.decode(fast.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
