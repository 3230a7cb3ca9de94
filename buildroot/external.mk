include $(sort $(wildcard $(BR2_EXTERNAL_STOREBOX_PATH)/package/*/*.mk))
