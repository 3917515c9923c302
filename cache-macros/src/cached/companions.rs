//! The companions: what invalidation, `peek!` and `refresh!` call, type-checked against
//! the function's parameters. One set of functions, named for where they live (see
//! [`Companions`]): associated functions of a struct named like a free function, or
//! of the method's own type.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, ToTokens};
use syn::punctuated::Punctuated;
use syn::{FnArg, Ident, Pat, Token, Type};

use super::parse::{CachedFn, Companions};
use super::{Common, Receiver};

/// The companions' names: `__cache_key` in a free function's struct,
/// `__cache_key_{function}` among a type's associated functions.
pub(super) struct Names {
    pub(super) descriptor: Ident,
    pub(super) write: Ident,
    key: Ident,
    peek: Ident,
    refresh: Ident,
}

impl Names {
    pub(super) fn of(f: &CachedFn) -> Option<Names> {
        let name = |what: &str| match f.companions {
            Companions::Free => format_ident!("__cache_{}", what),
            _ => format_ident!("__cache_{}_{}", what, f.func.sig.ident),
        };
        (!matches!(f.companions, Companions::None)).then(|| Names {
            descriptor: name("descriptor"),
            write: name("write"),
            key: name("key"),
            peek: name("peek"),
            refresh: name("refresh"),
        })
    }
}

pub(super) fn companions(f: &CachedFn, c: &Common) -> TokenStream {
    let Some(Names {
        descriptor,
        write,
        key,
        peek,
        refresh,
    }) = Names::of(f)
    else {
        return quote!();
    };
    let sig = &f.func.sig;
    let fn_name = &sig.ident;
    let vis = &f.func.vis;
    let ret_ty = &f.ret_ty;
    let (kind_path, ops, self_type, turbofish) = (&c.kind_path, &c.ops, &c.self_type, &c.turbofish);
    let descriptor_static = &c.descriptor_static;
    let (impl_generics, _, where_clause) = sig.generics.split_for_impl();
    let same_params = companion_params(&sig.inputs, false);
    let key_params = companion_params(&sig.inputs, true);
    let call_args: Vec<&Ident> = f.params.iter().filter_map(|p| p.ident.as_ref()).collect();
    let ref_writes = c.write_call(f, true, false);
    let write_params: Vec<TokenStream> = f
        .params
        .iter()
        .filter(|p| !p.skipped)
        .map(|p| match (&p.ident, &p.ty) {
            (None, _) => quote!(&self),
            (Some(id), Some(ty)) => match ty {
                _ if p.is_ref => quote!(#id: #ty),
                Type::ImplTrait(_) | Type::TraitObject(_) => quote!(#id: &(#ty)),
                _ => quote!(#id: &#ty),
            },
            (Some(_), None) => unreachable!("typed parameters have a type"),
        })
        .collect();
    let write_body = c.key_writes(&f.params, Receiver::ByRef, true);
    let asyncness = sig.asyncness;
    let dot_await = f.is_async.then(|| quote!(.await));
    let allows = quote! {
        #[doc(hidden)]
        #[allow(dead_code, unused_variables, clippy::needless_borrow, clippy::borrow_deref_ref, clippy::too_many_arguments, clippy::extra_unused_type_parameters, clippy::ptr_arg, clippy::unused_async)]
    };
    let call = match (&f.companions, f.has_receiver) {
        (Companions::Free, _) => quote!(#fn_name #turbofish (#(#call_args),*)),
        (_, true) => quote!(self.#fn_name #turbofish (#(#call_args),*)),
        (_, false) => quote!(Self::#fn_name #turbofish (#(#call_args),*)),
    };
    let functions = quote! {
        #allows
        #[inline]
        #vis fn #descriptor() -> &'static ::cache_runtime::__private::Descriptor {
            #descriptor_static
            &__CACHE_DESCRIPTOR
        }
        #allows
        #vis fn #write #impl_generics (#(#write_params,)* __w: &mut ::cache_runtime::__private::KeyWriter) #where_clause {
            #write_body
        }
        #allows
        #vis fn #key #impl_generics (#key_params) -> ::cache_runtime::__private::CallKey #where_clause {
            ::cache_runtime::__private::call_key(Self::#descriptor(), #self_type, |__w: &mut ::cache_runtime::__private::KeyWriter| { #ref_writes })
        }
        #allows
        #vis fn #peek #impl_generics (#key_params) -> ::core::option::Option<#ret_ty> #where_clause {
            ::cache_runtime::__private::peek::<#kind_path, _>(Self::#descriptor(), #self_type, #ops, |__w: &mut ::cache_runtime::__private::KeyWriter| { #ref_writes })
        }
        #allows
        #vis #asyncness fn #refresh #impl_generics (#same_params) -> #ret_ty #where_clause {
            ::cache_runtime::__private::refresh_next_call();
            #call #dot_await
        }
    };
    if !matches!(f.companions, Companions::Free) {
        return functions;
    }
    // A free function: its companions are associated functions of a struct of the same
    // name, and a macro of the same name resolves invalidation by parameter name.
    let named_writes = c.write_call(f, true, true);
    let key_param_names: Vec<String> = f
        .params
        .iter()
        .filter(|p| !p.skipped)
        .filter_map(|p| p.ident.as_ref().map(Ident::to_string))
        .collect();
    let by_name_macro = format_ident!("__cache_companion_{}", fn_name);
    let fn_name_str = fn_name.to_string();
    quote! {
        #[doc(hidden)]
        #[allow(non_camel_case_types, dead_code)]
        #vis struct #fn_name {}

        impl #fn_name {
            #functions
            #allows
            #vis fn __cache_key_named #impl_generics (#(#write_params),*) -> ::cache_runtime::__private::CallKey #where_clause {
                ::cache_runtime::__private::call_key(Self::#descriptor(), #self_type, |__w: &mut ::cache_runtime::__private::KeyWriter| { #named_writes })
            }
        }

        #[doc(hidden)]
        macro_rules! #by_name_macro {
            ($($args:tt)*) => {
                ::cache_runtime::__private::by_name! { target = #fn_name_str, key_params = [#(#key_param_names),*], $($args)* }
            };
        }
        #[doc(hidden)]
        #[allow(unused_imports)]
        pub(crate) use #by_name_macro as #fn_name;
    }
}

/// The parameters of a companion: the function's, with `mut` bindings dropped; with
/// `ref_receiver`, the receiver taken as `&self`.
fn companion_params(inputs: &Punctuated<FnArg, Token![,]>, ref_receiver: bool) -> TokenStream {
    let params = inputs.iter().map(|arg| match arg {
        FnArg::Receiver(r) if ref_receiver => {
            let _ = r;
            quote!(&self)
        }
        FnArg::Receiver(r) => r.to_token_stream(),
        FnArg::Typed(pt) => {
            let ty = &pt.ty;
            match &*pt.pat {
                Pat::Ident(pi) => {
                    let id = &pi.ident;
                    quote!(#id: #ty)
                }
                other => quote!(#other: #ty),
            }
        }
    });
    quote!(#(#params),*)
}
