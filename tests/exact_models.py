"""Models whose log p(x) and posterior are known in closed form, shared by the tests."""

import pyro
import pyro.distributions as dist
import torch

D64 = torch.float64


class LinearGaussian:
    """p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I): marginal and posterior in closed form."""

    def __init__(self, z_dim=3, x_dim=5, sigma=0.7, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(x_dim, z_dim, generator=g, dtype=D64)
        self.b = torch.randn(x_dim, generator=g, dtype=D64)
        self.sigma, self.z_dim, self.x_dim = sigma, z_dim, x_dim
        precision = torch.eye(z_dim, dtype=D64) + self.W.T @ self.W / sigma**2
        self.post_cov = torch.linalg.inv(precision)

    def sample_x(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.z_dim, generator=g, dtype=D64)
        return (
            z @ self.W.T + self.b + self.sigma * torch.randn(n, self.x_dim, generator=g, dtype=D64)
        )

    def exact_log_px(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.x_dim, dtype=D64)
        return dist.MultivariateNormal(self.b, cov).log_prob(x)

    def post_mean(self, x):
        return (x - self.b) @ self.W @ self.post_cov / self.sigma**2

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.z_dim, dtype=D64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def exact_guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(self.post_mean(x), self.post_cov))

    def wrong_q(self, x):
        # Shifted by half a posterior sd and 1.3 times wider (so the weights have finite
        # variance), with the correlations dropped.
        sd = self.post_cov.diagonal().sqrt()
        return dist.Normal(self.post_mean(x) + 0.5 * sd, 1.3 * sd).to_event(1)

    def wrong_guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.wrong_q(x))

    def kl_wrong_to_posterior(self, x):
        q = self.wrong_q(x)
        q_mvn = dist.MultivariateNormal(q.base_dist.loc, torch.diag_embed(q.base_dist.scale**2))
        post = dist.MultivariateNormal(self.post_mean(x), self.post_cov)
        return torch.distributions.kl_divergence(q_mvn, post)
