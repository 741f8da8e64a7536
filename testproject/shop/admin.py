from django.contrib import admin

from .models import Customer, Listing, Order, OrderLine, Product


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin):
    list_display = ("name", "email")
    search_fields = ("name", "email")


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ("sku", "name", "price", "stock")
    search_fields = ("sku", "name")


class OrderLineInline(admin.TabularInline):
    model = OrderLine
    extra = 0
    raw_id_fields = ("product",)


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ("id", "customer", "created_at", "status")
    list_filter = ("status",)
    date_hierarchy = "created_at"
    raw_id_fields = ("customer",)
    inlines = [OrderLineInline]


@admin.register(OrderLine)
class OrderLineAdmin(admin.ModelAdmin):
    list_display = ("order", "product", "quantity", "price")
    raw_id_fields = ("order", "product")


@admin.register(Listing)
class ListingAdmin(admin.ModelAdmin):
    list_display = ("title", "product", "seller", "condition", "price", "quantity", "sold", "is_active", "created_at")
    list_filter = ("condition", "is_active", "location_country")
    list_select_related = ("product", "seller")
    search_fields = ("title", "brand")
    raw_id_fields = ("product", "seller")
    date_hierarchy = "created_at"
    list_per_page = 50
