//! `gateway` binary (skeleton; see issue 3).
fn main() -> anyhow::Result<()> {
    anyhow::bail!("the gateway is not built yet")
}
