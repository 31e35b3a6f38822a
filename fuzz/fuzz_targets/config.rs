//! Fuzzes graft's config parsers: the first byte picks one of `OutgoingLocal`,
//! `PortMapping`, `Target`, `FsMode` (`FromStr`, fed from flags) or a whole
//! `graft.toml` (`ConfigFile`), which is then resolved into a `Config` as
//! `graft run` would. Errors are fine; panics are not.
#![no_main]

use graft_config::{Config, ConfigFile, FsMode, OutgoingLocal, PortMapping, RunOverrides, Target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 5 {
        0 => drop(text.parse::<OutgoingLocal>()),
        1 => drop(text.parse::<PortMapping>()),
        2 => drop(text.parse::<Target>()),
        3 => drop(text.parse::<FsMode>()),
        _ => {
            if let Ok(file) = toml::from_str::<ConfigFile>(text) {
                let flags = RunOverrides {
                    target: Some("pid:1".into()),
                    ..RunOverrides::default()
                };
                drop(Config::resolve(
                    &flags,
                    &file,
                    Some("/work".as_ref()),
                    Some("/root".as_ref()),
                ));
            }
        }
    }
});
