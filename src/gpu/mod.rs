//! Everything that touches the GPU: opening it, the weights in kernel layout,
//! and the decoder that launches the kernels.

pub mod decoder;
pub mod device;
pub mod weights;

pub use decoder::GpuDecoder;

/// A tuning setting from the environment: None when unset, an error naming
/// it when it is not text (rather than ignoring it).
pub(crate) fn env_setting(name: &str) -> anyhow::Result<Option<String>> {
    match std::env::var(name) {
        Ok(text) => Ok(Some(text)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!(
                "{name} is not text; unset it or give it one of the values the README lists"
            )
        }
    }
}

/// The count a setting `name` gives as `text`, if it is one within `range`
/// (of `unit`s), else an error naming the setting and the range.
pub(crate) fn count_setting(
    name: &str,
    text: &str,
    range: std::ops::RangeInclusive<usize>,
    unit: &str,
) -> anyhow::Result<usize> {
    match text.trim().parse::<usize>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => anyhow::bail!(
            "{name}={text:?} is not a number of {unit} from {} to {}; unset it or pick one",
            range.start(),
            range.end()
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_setting_that_is_not_text_is_an_error_not_ignored() {
        // A name no other test touches: tests run on several threads.
        let name = "QWEN_MK_TEST_ENV_SETTING";
        assert_eq!(super::env_setting(name).unwrap(), None);
        unsafe { std::env::set_var(name, "3") };
        assert_eq!(super::env_setting(name).unwrap().as_deref(), Some("3"));
        unsafe { std::env::set_var(name, OsStr::from_bytes(b"\xff")) };
        let err = super::env_setting(name).unwrap_err().to_string();
        assert!(
            err.contains("QWEN_MK_TEST_ENV_SETTING is not text"),
            "{err}"
        );
        unsafe { std::env::remove_var(name) };
    }
}
