//! Parsing of `#[cached(...)]` options.

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Ident, LitBool, LitInt, LitStr, Token};

const OPTIONS: &str = "profile, ttl, sliding, skip, name, version, local, cache_none";

pub(crate) enum Expiry {
    Ttl(u64),
    Sliding(u64),
}

#[derive(Default)]
pub(crate) struct Options {
    pub profile: Option<LitStr>,
    pub expiry: Option<(Expiry, Span)>,
    pub skip: Vec<Ident>,
    pub name: Option<LitStr>,
    pub version: Option<u32>,
    pub local: Option<Span>,
    pub cache_none: Option<(bool, Span)>,
}

/// Collects every problem instead of stopping at the first one.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }
    pub fn add(&mut self, span: Span, msg: impl std::fmt::Display) {
        self.push(syn::Error::new(span, msg));
    }
    pub fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

impl Parse for Options {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut opts = Options::default();
        let mut errors = Errors::default();
        let mut seen: Vec<String> = Vec::new();
        while !input.is_empty() {
            let key = Ident::parse_any(input)?;
            let name = key.to_string();
            if seen.contains(&name) {
                errors.add(
                    key.span(),
                    format!("option `{name}` is given twice; keep one"),
                );
            }
            seen.push(name.clone());
            match name.as_str() {
                "profile" => {
                    let lit = value::<LitStr>(
                        input,
                        &key,
                        "a profile name, as in `profile = \"catalog\"`",
                    )?;
                    if lit.value().is_empty() {
                        errors.add(lit.span(), "the profile name is empty; name a profile configured with `Profile::new(..)`, or remove the option to use \"default\"");
                    }
                    opts.profile = Some(lit);
                }
                "ttl" | "sliding" => {
                    let lit =
                        value::<LitStr>(input, &key, "a duration string, as in `ttl = \"10m\"`")?;
                    match parse_duration(&lit.value()) {
                        Ok(nanos) => {
                            if opts.expiry.is_some() {
                                errors.add(key.span(), "`ttl` and `sliding` cannot be combined: use `ttl` for expiry a fixed time after the value is stored, or `sliding` for expiry after a time without reads");
                            }
                            let e = if name == "ttl" {
                                Expiry::Ttl(nanos)
                            } else {
                                Expiry::Sliding(nanos)
                            };
                            opts.expiry = Some((e, key.span()));
                        }
                        Err(why) => errors.add(
                            lit.span(),
                            format!("invalid duration {:?}: {why}", lit.value()),
                        ),
                    }
                }
                "skip" => {
                    let content;
                    if !input.peek(syn::token::Paren) {
                        return Err(syn::Error::new(
                            key.span(),
                            "`skip` lists parameters, as in `skip(db, self)`",
                        ));
                    }
                    syn::parenthesized!(content in input);
                    let names = Punctuated::<Ident, Token![,]>::parse_terminated_with(
                        &content,
                        Ident::parse_any,
                    )?;
                    opts.skip.extend(names);
                }
                "name" => {
                    let lit = value::<LitStr>(
                        input,
                        &key,
                        "a key name, as in `name = \"catalog.product\"`",
                    )?;
                    let v = lit.value();
                    if v.is_empty()
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_:.-/".contains(c))
                    {
                        errors.add(lit.span(), "a key name may use ASCII letters, digits and `_ : . - /`, and must not be empty");
                    }
                    opts.name = Some(lit);
                }
                "version" => {
                    let lit = value::<LitInt>(input, &key, "a number, as in `version = 2`")?;
                    match lit.base10_parse::<u32>() {
                        Ok(v) => opts.version = Some(v),
                        Err(_) => errors.add(
                            lit.span(),
                            "`version` must be a whole number from 0 to 4294967295",
                        ),
                    }
                }
                "local" => {
                    if input.peek(Token![=]) {
                        return Err(syn::Error::new(
                            key.span(),
                            "`local` takes no value: write `local`",
                        ));
                    }
                    opts.local = Some(key.span());
                }
                "cache_none" => {
                    let lit = value::<LitBool>(
                        input,
                        &key,
                        "`true` or `false`, as in `cache_none = false`",
                    )?;
                    opts.cache_none = Some((lit.value, key.span()));
                }
                _ => {
                    errors.add(
                        key.span(),
                        format!("unknown option `{name}`; the options are: {OPTIONS}"),
                    );
                    // Skip its value so the remaining options are still checked.
                    if input.peek(Token![=]) {
                        input.parse::<Token![=]>()?;
                        input.parse::<syn::Expr>()?;
                    } else if input.peek(syn::token::Paren) {
                        let _content;
                        syn::parenthesized!(_content in input);
                    }
                }
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        errors.finish()?;
        Ok(opts)
    }
}

fn value<T: Parse>(input: ParseStream, key: &Ident, expected: &str) -> syn::Result<T> {
    if !input.peek(Token![=]) {
        return Err(syn::Error::new(
            key.span(),
            format!("`{key}` needs a value: {expected}"),
        ));
    }
    input.parse::<Token![=]>()?;
    input
        .parse::<T>()
        .map_err(|e| syn::Error::new(e.span(), format!("`{key}` expects {expected}")))
}

/// Parses `"10m"`, `"1h30m"`, `"250ms"` into nanoseconds.
pub(crate) fn parse_duration(s: &str) -> Result<u64, String> {
    const HINT: &str =
        "expected a number followed by a unit (ms, s, m, h, d), for example \"10m\" or \"1h30m\"";
    let mut total: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(HINT.into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(HINT.into());
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| "the number is too large".to_string())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let scale: u64 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            "" => return Err(format!("`{n}` has no unit; {HINT}")),
            other => return Err(format!("unknown unit `{other}`; {HINT}")),
        };
        total = n
            .checked_mul(scale)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| "the duration is too long".to_string())?;
        rest = &rest[unit_len..];
    }
    if total == 0 {
        return Err("a zero duration would never serve a hit; remove the option, or disable the profile to turn caching off".into());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(250_000_000));
        assert_eq!(parse_duration("10m"), Ok(600_000_000_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000_000_000));
        assert_eq!(parse_duration("2d"), Ok(172_800_000_000_000));
        for bad in [
            "",
            "10",
            "m",
            "10x",
            "1.5h",
            "0s",
            "99999999999999999999s",
            "10 m",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
