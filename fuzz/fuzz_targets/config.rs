//! `config::Config::from_yaml` on any UTF-8 text (a config file, or the
//! ConfigMap the operator writes), then `validate` on what parses.
//!
//! Checks, from config.rs, forwarding.rs and docs/configuration.md:
//! - parsing and validation are deterministic and never panic;
//! - `Debug` never shows a secret (`trigger.token`, `broker.amqp.url`):
//!   the Debug text does not change when the secrets do;
//! - a `broker.*` validation error never quotes the AMQP URL (it holds a
//!   password), unless the URL is text of the message itself (a message
//!   given for another URL holds it too);
//! - a printed config reads back (`check-config` prints it with
//!   `serde_yaml::to_string`): printing what was read back gives the same
//!   text, and it validates the same way.
#![no_main]

use high_templar_gateway::config::{Config, ConfigError, Secret};
use libfuzzer_sys::fuzz_target;

/// The config with every secret replaced by `with`.
fn with_secrets(config: &Config, with: &str) -> Config {
    let mut c = config.clone();
    if c.trigger.token.is_some() {
        c.trigger.token = Some(Secret(with.into()));
    }
    if c.broker.amqp.url.is_some() {
        c.broker.amqp.url = Some(Secret(with.into()));
    }
    c
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = Config::from_yaml(text);
    let config = match (parsed, Config::from_yaml(text)) {
        (Ok(a), Ok(b)) => {
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "deterministic");
            a
        }
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "deterministic");
            return;
        }
        (a, b) => panic!("not deterministic: {:?} then {:?}", a.map(|_| ()), b.map(|_| ())),
    };

    let validated = config.validate();
    let outcome = |r: &Result<(), ConfigError>| r.as_ref().map_err(ToString::to_string).err();
    assert_eq!(outcome(&validated), outcome(&config.validate()), "deterministic");
    if let Err(ConfigError::Invalid { field, message }) = &validated
        && field.starts_with("broker.")
        && let Some(url) = &config.broker.amqp.url
        && url.0.len() >= 8
    {
        // The fuzzer copies message text into the URL (`n amqp:// or
        // amqps:/`): text that a message holds for a URL it never saw is
        // the message's own, not a leak.
        let fixed = |probe: &str| match with_secrets(&config, probe).validate() {
            Err(ConfigError::Invalid { message, .. }) => message.contains(&url.0),
            _ => false,
        };
        let own_text = ["\u{0}", "amqp://h/", "amqps://h/"].iter().any(|probe| fixed(probe));
        assert!(own_text || !message.contains(&url.0), "`{field}`: {message} quotes the AMQP URL");
    }

    let shown = format!("{config:?}");
    assert_eq!(shown, format!("{:?}", with_secrets(&config, "x")), "Debug shows a secret");

    let Ok(printed) = serde_yaml::to_string(&config) else { return };
    let reread = Config::from_yaml(&printed)
        .unwrap_or_else(|(field, message)| panic!("printed config {printed:?} does not read back: {field}: {message}"));
    let reprinted = serde_yaml::to_string(&reread).expect("a config read back prints");
    assert_eq!(printed, reprinted, "printed, read back and printed again");
    assert_eq!(outcome(&reread.validate()), outcome(&validated), "the printed config validates the same");
});
