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


class LinearGaussianChain:
    """z_L -> ... -> z_1 -> x, all linear-Gaussian: z_L ~ N(0, I),
    z_l | z_{l+1} ~ N(A_l z_{l+1} + a_l, s_l^2 I), x | z_1 ~ N(W z_1 + b, sigma^2 I).

    The posterior factorises bottom-up, p(z_1 | x) prod_l p(z_{l+1} | z_l) (given z_l, the
    layers above are independent of x), and every factor is Gaussian in closed form, so a
    guide q(z_1 | x) q(z_2 | z_1) ... with full-covariance Gaussians can be exact.  Sites are
    named ``z1`` (next to x) to ``zL`` (top)."""

    def __init__(self, dims=(3, 2), x_dim=5, sigma=0.7, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.dims, self.x_dim, self.sigma = tuple(dims), x_dim, sigma
        self.names = [f"z{i + 1}" for i in range(len(dims))]
        # A[l], a[l], s[l]: the conditional of layer l given layer l + 1 (0-based)
        self.A = [
            torch.randn(dims[i], dims[i + 1], generator=g, dtype=D64) for i in range(len(dims) - 1)
        ]
        self.a = [torch.randn(dims[i], generator=g, dtype=D64) for i in range(len(dims) - 1)]
        self.s = [0.5 + 0.1 * i for i in range(len(dims) - 1)]
        self.W = torch.randn(x_dim, dims[0], generator=g, dtype=D64)
        self.b = torch.randn(x_dim, generator=g, dtype=D64)
        # prior moments of every layer, top-down
        L = len(dims)
        self.m, self.C = [None] * L, [None] * L
        self.m[-1], self.C[-1] = torch.zeros(dims[-1], dtype=D64), torch.eye(dims[-1], dtype=D64)
        for i in reversed(range(L - 1)):
            self.m[i] = self.A[i] @ self.m[i + 1] + self.a[i]
            self.C[i] = self.A[i] @ self.C[i + 1] @ self.A[i].T + self.s[i] ** 2 * torch.eye(
                dims[i], dtype=D64
            )
        # the exact posterior: q(z1 | x), then q(z_{l+1} | z_l) = p(z_{l+1} | z_l)
        precision = torch.linalg.inv(self.C[0]) + self.W.T @ self.W / sigma**2
        self.post_cov = torch.linalg.inv(precision)
        self.gain, self.cond_cov = [], []
        for i in range(L - 1):
            gain = self.C[i + 1] @ self.A[i].T @ torch.linalg.inv(self.C[i])
            self.gain.append(gain)
            self.cond_cov.append(self.C[i + 1] - gain @ self.A[i] @ self.C[i + 1])

    def sample_x(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.dims[-1], generator=g, dtype=D64)
        for i in reversed(range(len(self.dims) - 1)):
            noise = torch.randn(n, self.dims[i], generator=g, dtype=D64)
            z = z @ self.A[i].T + self.a[i] + self.s[i] * noise
        noise = torch.randn(n, self.x_dim, generator=g, dtype=D64)
        return z @ self.W.T + self.b + self.sigma * noise

    def exact_log_px(self, x):
        cov = self.W @ self.C[0] @ self.W.T + self.sigma**2 * torch.eye(self.x_dim, dtype=D64)
        return dist.MultivariateNormal(self.W @ self.m[0] + self.b, cov).log_prob(x)

    def post_mean(self, x):
        rhs = torch.linalg.solve(self.C[0], self.m[0]) + (x - self.b) @ self.W / self.sigma**2
        return rhs @ self.post_cov

    def cond_mean(self, i, z_below):
        """E[z_{i+2} | z_{i+1}] (0-based i): the exact posterior's mean of the layer above."""
        return self.m[i + 1] + (z_below - self.m[i]) @ self.gain[i].T

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                self.names[-1], dist.Normal(torch.zeros(self.dims[-1], dtype=D64), 1.0).to_event(1)
            )
            for i in reversed(range(len(self.dims) - 1)):
                z = pyro.sample(
                    self.names[i], dist.Normal(z @ self.A[i].T + self.a[i], self.s[i]).to_event(1)
                )
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def exact_guide(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                self.names[0], dist.MultivariateNormal(self.post_mean(x), self.post_cov)
            )
            for i in range(len(self.dims) - 1):
                z = pyro.sample(
                    self.names[i + 1],
                    dist.MultivariateNormal(self.cond_mean(i, z), self.cond_cov[i]),
                )
